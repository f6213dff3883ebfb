# Sourced by the bench/*_gpu.sh and multigpu.sh scripts: Python packages the GPU image lacks come from the
# wheel folders .whl and .whl-rq (installed into /tmp/samlight-site unless SKIP_WHEELS is set), the repository
# goes on PYTHONPATH, and REDIS_SERVER's folder (if set) on LD_LIBRARY_PATH for the libraries it ships with.
PYTHON=${PYTHON:-python3}
if [ -n "${REDIS_SERVER:-}" ]; then
  export LD_LIBRARY_PATH="$(dirname "$REDIS_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
wheels=$(ls .whl/*.whl .whl-rq/*.whl 2>/dev/null || true)
if [ -n "$wheels" ] && [ -z "${SKIP_WHEELS:-}" ]; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/samlight-site $wheels
  export PYTHONPATH=/tmp/samlight-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LOG_LEVEL=WARNING

#!/usr/bin/env bash
# DLD on one GPU (about 8 minutes on an H100): distil lightening_t from random:vit_b and evaluate fidelity,
# align the decoder on COCO ground truth and evaluate box mIoU, and time the encoder stage with a random:vit_h
# teacher with and without the teacher feature cache. Results: OUT/distill_gpu.json + PNGs.
#
#   bench/distill_gpu.sh OUT COCO_TINY [extra flags of bench/distill_gpu.py, e.g. --phases 3]
#
# Python packages missing on the GPU image (segment_anything, pycocotools) are installed from the wheel
# folder .whl when they are not importable.
set -euo pipefail
OUT_DIR=${1:?usage: bench/distill_gpu.sh OUT COCO_TINY [flags]}
DATA=${2:?usage: bench/distill_gpu.sh OUT COCO_TINY [flags]}
shift 2
PYTHON=${PYTHON:-python3}
wheels=$(ls .whl/*.whl 2>/dev/null || true)
if [ -n "$wheels" ] && ! $PYTHON -c "import segment_anything, pycocotools" 2>/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/samlight-site $wheels
  export PYTHONPATH=/tmp/samlight-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PYTHON -c "import torch, segment_anything, pycocotools, cv2; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
exec $PYTHON bench/distill_gpu.py --out "$OUT_DIR" --data "$DATA" "$@"

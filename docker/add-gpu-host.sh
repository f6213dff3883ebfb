#!/usr/bin/env bash
# Join this GPU host to a running samlight deployment: one inference worker per GPU, on the main
# host's Redis, Label Studio and models folder. Run in the repository root of this host:
#
#   docker/add-gpu-host.sh            # every GPU nvidia-smi lists
#   docker/add-gpu-host.sh 0,1        # only these
#
# .env (from .env.example) must set REDIS_URL, LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_HOST_DIR,
# SAMLIGHT_HOST_LABEL and SAMLIGHT_CHECKPOINT for this host (docs/operations.md "Add a GPU host").
set -euo pipefail
cd "$(dirname "$0")/.."

gpus="${1:-all}"
if [ ! -f .env ]; then
  echo "add-gpu-host: no .env here: cp .env.example .env and set the extra-GPU-host variables" >&2
  exit 2
fi
for var in REDIS_URL LABEL_STUDIO_URL LABEL_STUDIO_API_KEY MODEL_HOST_DIR SAMLIGHT_HOST_LABEL SAMLIGHT_CHECKPOINT; do
  if ! grep -Eq "^${var}=.+" .env; then
    echo "add-gpu-host: set ${var} in .env" >&2
    exit 2
  fi
done

python3 docker/gen-compose.py --remote --gpus "$gpus"

# later `docker compose ps/logs/down` in this folder then mean this host's workers
files="docker/docker-compose.workers.yml:docker/docker-compose.remote-gpus.yml"
if grep -q '^COMPOSE_FILE=' .env; then
  sed -i "s#^COMPOSE_FILE=.*#COMPOSE_FILE=${files}#" .env
else
  echo "COMPOSE_FILE=${files}" >> .env
fi

exec docker compose --env-file .env -f docker/docker-compose.workers.yml -f docker/docker-compose.remote-gpus.yml \
  up -d --build --remove-orphans

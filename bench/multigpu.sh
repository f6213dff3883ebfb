#!/usr/bin/env bash
# Several GPUs of one host (nvidia-h200-x2 or larger, under 10 minutes): torchrun DLD scaling and one inference
# worker per GPU under the load generator, through bench/multigpu.py. Results: OUT/multigpu.json + PNG + reports.
#
#   bench/multigpu.sh OUT COCO_TINY REDIS_SERVER [flags of bench/multigpu.py]
#
# REDIS_SERVER's folder may hold the shared libraries it needs. Python packages missing on the GPU image
# (segment_anything, pycocotools, rq, flask, gunicorn, label-studio-sdk, ...) come from the wheel folders
# .whl and .whl-rq when they exist.
set -euo pipefail
OUT_DIR=${1:?usage: bench/multigpu.sh OUT COCO_TINY REDIS_SERVER [flags]}
DATA=${2:?usage: bench/multigpu.sh OUT COCO_TINY REDIS_SERVER [flags]}
REDIS_SERVER=$(realpath -s "${3:?usage: bench/multigpu.sh OUT COCO_TINY REDIS_SERVER [flags]}")
shift 3
PYTHON=${PYTHON:-python3}
# NVLink multicast off, also for every process started from here
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source bench/gpu_env.sh
"$REDIS_SERVER" --version
$PYTHON -c "import torch, rq, segment_anything, pycocotools; print('torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"
exec $PYTHON bench/multigpu.py --out "$OUT_DIR" --data "$DATA" --redis-server "$REDIS_SERVER" "$@"

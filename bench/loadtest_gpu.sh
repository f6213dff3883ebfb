#!/usr/bin/env bash
# GPU load test of the RQ serving path (one H100, < 6 minutes): where a cached click's time goes
# (bench/click_breakdown.py), then redis-server + RQ inference workers on the GPU + the backend under gunicorn
# + simulated annotators, through bench/loadtest.py. Writes five JSON reports.
#
#   bench/loadtest_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]
#
# REDIS_SERVER: path of a redis-server binary; its folder may hold the shared libraries it needs (liblzf,
# libjemalloc), which are put on LD_LIBRARY_PATH. IMAGES_DIR: task images (default .loadtest-images, a copy
# of ../shared/data/coco_tiny/val2017, which does not travel). OUT_DIR: default $OUT, else bench/results.
# Python packages missing on the GPU image (rq, redis, flask, gunicorn, label-studio-sdk and its needs,
# segment_anything) are installed from the wheel folders .whl and .whl-rq when they exist.
set -euo pipefail
REDIS_SERVER=$(realpath -s "${1:?usage: bench/loadtest_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]}")
IMAGES=${2:-.loadtest-images}
RESULTS=${3:-${OUT:-bench/results}}
PYTHON=${PYTHON:-python3}
# overridable for a dry run on CPU: GPUS=-1,-1 GPU1=-1 MODEL=lightening_test SKIP_WHEELS=1 PYTHON=.venv/bin/python
GPUS=${GPUS:-0,0}
GPU1=${GPU1:-0}
MODEL=${MODEL:-lightening_t}
DURATION=${DURATION:-75}  # seconds per load test
mkdir -p "$RESULTS"
source bench/gpu_env.sh
"$REDIS_SERVER" --version
$PYTHON -c "import torch, rq, flask, gunicorn, label_studio_sdk, segment_anything; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
stamp=$(date -u +%Y%m%d-%H%M)
# 0. one cached click split into worker compute, the RQ round trip and the backend's /predict
$PYTHON bench/click_breakdown.py --redis-server "$REDIS_SERVER" --images "$IMAGES" --gpu "$GPU1" --random "$MODEL" \
  --out "$RESULTS/click-breakdown-gpu-$stamp.json" || true
common=(--spawn --python "$PYTHON" --redis-server "$REDIS_SERVER" --images "$IMAGES" --random "$MODEL"
        --max-images 80 --deadline-ms 5000 --duration "$DURATION")
# 1. two workers on GPU 0, no prewarm: a task's first click is uncached, the follow-ups cached
$PYTHON bench/loadtest.py "${common[@]}" --workers 2 --gpus="$GPUS" --annotators 8 --tasks-per-annotator 10 --clicks 8 \
  --no-prewarm --out "$RESULTS/loadtest-gpu-2workers-noprewarm-$stamp.json" || true
# 2. the same with Label Studio's prewarm when a task opens (batch /predict, context null), 200 ms to look
$PYTHON bench/loadtest.py "${common[@]}" --workers 2 --gpus="$GPUS" --annotators 8 --tasks-per-annotator 10 --clicks 8 \
  --open-ms 200 --out "$RESULTS/loadtest-gpu-2workers-prewarm-$stamp.json" || true
# 3. one worker, one annotator clicking back to back: the unloaded latency of the stack (each click arrives
# while the worker still records the previous one with RQ)
$PYTHON bench/loadtest.py "${common[@]}" --workers 1 --gpus="$GPU1" --annotators 1 --tasks-per-annotator 20 --clicks 8 \
  --no-prewarm --out "$RESULTS/loadtest-gpu-1worker-1annotator-$stamp.json" || true
# 4. the same annotator with a human's pause between clicks (200 ms mean)
$PYTHON bench/loadtest.py "${common[@]}" --workers 1 --gpus="$GPU1" --annotators 1 --tasks-per-annotator 20 --clicks 8 \
  --no-prewarm --think-ms 200 --out "$RESULTS/loadtest-gpu-1worker-1annotator-think200-$stamp.json" || true
ls -l "$RESULTS"/loadtest-gpu-*-"$stamp".json

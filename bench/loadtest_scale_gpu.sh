#!/usr/bin/env bash
# Serving scale on one GPU host (issue 20: >= 300 clicks/s at p99 <= 50 ms through the whole stack): several
# backend processes under gunicorn, several RQ inference workers sharing GPU 0, one redis-server, and
# annotators (with a human's pause between clicks, or back to back) spread over 4 load-generator processes.
#
#   bench/loadtest_scale_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]
#
# Same arguments and wheel folders as bench/loadtest_gpu.sh. Random weights make every mask 50-90 KB of brush
# RLE (noise), more than a real mask costs, so these numbers are a pessimistic bound on the payload's cost.
set -euo pipefail
REDIS_SERVER=$(realpath -s "${1:?usage: bench/loadtest_scale_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]}")
IMAGES=${2:-.loadtest-images}
RESULTS=${3:-${OUT:-bench/results}}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-lightening_t}
DURATION=${DURATION:-40}  # seconds per load test
GPU=${GPU:-0}
mkdir -p "$RESULTS"
source bench/gpu_env.sh
stamp=$(date -u +%Y%m%d-%H%M)
# scale BACKENDS WORKERS ANNOTATORS THINK_MS NAME [TORCH_THREADS: each process's intra-op threads]
scale() {
  local gpus=$GPU n
  for ((n = 1; n < $2; n++)); do gpus+=",$GPU"; done
  timeout -k 10 $((DURATION + 150)) $PYTHON bench/loadtest.py --spawn --python "$PYTHON" --redis-server "$REDIS_SERVER" \
    --images "$IMAGES" --random "$MODEL" --max-images 80 --deadline-ms 5000 --duration "$DURATION" \
    --backend-processes "$1" --backend-threads 16 --workers "$2" --gpus="$gpus" --annotators "$3" --think-ms "$4" \
    --open-ms 200 --tasks-per-annotator 1000 --clicks 8 --load-processes 4 ${6:+--torch-threads "$6"} \
    --out "$RESULTS/loadtest-scale-$5-$stamp.json" || true
}
scale 6 3 64 150 6backends-3workers-64annotators-think150
scale 8 4 96 200 8backends-4workers-96annotators-think200
scale 8 4 64 0 8backends-4workers-64annotators-backtoback
# the same with 2 torch threads per process: by default each of 4 workers starts one per core (16 here), and
# the workers used 2.3 cores each at 259 clicks/s (loadtest-scale-h200-cpu-split-20261203.json)
scale 8 4 64 0 8backends-4workers-64annotators-backtoback-2threads 2
ls -l "$RESULTS"/loadtest-scale-*-"$stamp".json

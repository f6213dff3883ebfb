#!/usr/bin/env bash
# Serving scale on one GPU host (issue 20: >= 300 clicks/s at p99 <= 50 ms through the whole stack): several
# backend processes under gunicorn, several RQ inference workers sharing GPU 0, one redis-server, and
# annotators (with a human's pause between clicks, or back to back) spread over LOAD_PROCESSES load generators.
#
#   [CHECKPOINT=student_dir] [CONFIGS=...] bench/loadtest_scale_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]
#
# Same arguments and wheel folders as bench/loadtest_gpu.sh. Random weights make every mask 50-90 KB of brush
# RLE (noise), far more than a real mask costs; CHECKPOINT names a trained student instead.
set -euo pipefail
REDIS_SERVER=$(realpath -s "${1:?usage: bench/loadtest_scale_gpu.sh REDIS_SERVER [IMAGES_DIR] [OUT_DIR]}")
IMAGES=${2:-.loadtest-images}
RESULTS=${3:-${OUT:-bench/results}}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-lightening_t}
CHECKPOINT=${CHECKPOINT:-}  # a trained student directory instead of random weights
LOAD_PROCESSES=${LOAD_PROCESSES:-4}
DURATION=${DURATION:-40}  # seconds per load test
GPU=${GPU:-0}
mkdir -p "$RESULTS"
source bench/gpu_env.sh
stamp=$(date -u +%Y%m%d-%H%M)
# each configuration: BACKENDS,WORKERS,ANNOTATORS,THINK_MS,TORCH_THREADS,MIN_AREA
#   TORCH_THREADS: each process's intra-op threads (0: torch's default, one per core)
#   MIN_AREA: the mask clean-up's SAMLIGHT_MIN_AREA (100 is the default; 0 skips the clean-up, which a random
#   model's noise masks make far dearer than a real mask's)
# (the defaults: the measured best with pauses, 4 and 8 workers, with and without the clean-up; then capacity)
CONFIGS=${CONFIGS:-"8,4,96,200,0,0 8,8,96,200,0,0 8,4,96,200,0,100 8,4,64,0,0,0"}
for config in $CONFIGS; do
  IFS=, read -r backends workers annotators think threads min_area <<< "$config"
  gpus=$GPU
  for ((n = 1; n < workers; n++)); do gpus+=",$GPU"; done
  name="${backends}backends-${workers}workers-${annotators}annotators-think${think}-threads${threads}-minarea${min_area}"
  SAMLIGHT_MIN_AREA=$min_area timeout -k 10 $((DURATION + 150)) $PYTHON bench/loadtest.py --spawn --python "$PYTHON" \
    --redis-server "$REDIS_SERVER" --images "$IMAGES" --random "$MODEL" ${CHECKPOINT:+--checkpoint "$CHECKPOINT"} \
    --max-images 80 --deadline-ms 5000 \
    --duration "$DURATION" --backend-processes "$backends" --backend-threads 16 --workers "$workers" --gpus="$gpus" \
    --annotators "$annotators" --think-ms "$think" --open-ms 200 --tasks-per-annotator 1000 --clicks 8 \
    --load-processes "$LOAD_PROCESSES" --torch-threads "$threads" --out "$RESULTS/loadtest-scale-$name-$stamp.json" || true
done
ls -l "$RESULTS"/loadtest-scale-*-"$stamp".json

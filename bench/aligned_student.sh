#!/usr/bin/env bash
# A student whose mask decoder learnt COCO's ground-truth masks (no teacher loss, the random encoder frozen),
# for load tests: a random model answers every click with noise (50-90 KB of brush RLE, thousands of specks
# for the clean-up), this one with blobs of a real mask's size and shape. Its masks are not good ones; only
# their size and shape are realistic.
#
#   bench/aligned_student.sh OUT_DIR [COCO_ROOT] [STEPS]
#
# About 15 minutes on 2 CPU cores (the teacher's features of the 16 images dominate); seconds on a GPU.
set -euo pipefail
OUT=${1:?usage: bench/aligned_student.sh OUT_DIR [COCO_ROOT] [STEPS]}
COCO=${2:-../shared/data/coco_tiny}
STEPS=${3:-400}
PYTHON=${PYTHON:-python3}
$PYTHON -m samlight.cli distill --teacher random:vit_b --student lightening_t \
  --coco "$COCO/annotations/instances_train2017.json:$COCO/train2017" --max-images 16 --out "$OUT" \
  --encoder-steps 0 --decoder-steps "$STEPS" --teacher-loss-weight 0 --unfreeze-blocks 0 --decoder-lr 3e-4 \
  --batch-size 4 --checkpoint-every 100 --no-progress

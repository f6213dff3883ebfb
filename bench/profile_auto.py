"""Where the automatic masks' time goes on CUDA: a torch.profiler table of one image's grid (32×32 points,
decoder batches of 256) on random ``lightening_t`` weights, top kernels by CUDA time.

    python bench/profile_auto.py [--batch 256] [--rows 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--model", default="random:lightening_t")
    args = parser.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from samlight.models import ModelSpec
    from serving.automatic import AutoSpec, automatic_masks
    from serving.engine import ModelHolder, PredictorSettings

    spec = ModelSpec.parse(args.model)
    served = ModelHolder(PredictorSettings(device="cuda"), 0).build(spec.load(), spec.version)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    embedding = served.predictor.embed(image)
    auto = AutoSpec(batch=args.batch)
    for _ in range(2):
        automatic_masks(served.predictor, embedding, auto)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        automatic_masks(served.predictor, embedding, auto)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

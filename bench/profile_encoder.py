"""Where the encoder's time goes on a GPU: torch.profiler's top CUDA kernels for one config.

    python bench/profile_encoder.py --config lightening_t --dtype bf16 --out $OUT/profile.txt
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from samlight.models import random_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="lightening_t")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    encoder = random_model(args.config).image_encoder.cuda().to(dtype).eval()
    x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for _ in range(5):
            encoder(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                encoder(x)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

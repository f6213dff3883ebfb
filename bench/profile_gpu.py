"""Where the GPU time goes: torch.profiler's top CUDA kernels for the encoder or the prompt decoder.

    python bench/profile_gpu.py encoder --config lightening_t --dtype bf16 --out $OUT/profile.txt
    python bench/profile_gpu.py decoder [--fp32-decoder] [--cudnn-benchmark]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from samlight.bench import time_ms
from samlight.models import ModelSpec
from samlight.predictor import Predictor


def top_kernels(step: Callable[[], object], out: str | None, rows: int = 30) -> None:
    """Profile ten calls of ``step`` (after warm-up) and print the kernels by CUDA time."""
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table)


def profile_encoder(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    encoder = ModelSpec.random(args.config).load().image_encoder.cuda().to(dtype).eval()
    x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=dtype)
    with torch.inference_mode():
        top_kernels(lambda: encoder(x), args.out)


def profile_decoder(args: argparse.Namespace) -> None:
    """Box prompt -> mask with a cached embedding: the graphed path's time, then the eager path's kernels."""
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    box = np.array([[100.0, 80.0, 400.0, 360.0]])
    graphed = Predictor(ModelSpec.random(args.config).load(), device="cuda", autocast=not args.fp32_decoder)
    embedding = graphed.embed(image)
    times = time_ms(lambda: graphed._decode(embedding, None, None, box, None, False), torch.device("cuda"), 50, 5)
    print(f"decode (graphed) median {statistics.median(times):.3f} ms, cudnn.benchmark={args.cudnn_benchmark}, "
          f"decoder {'fp32' if args.fp32_decoder else 'bf16 autocast'}")
    eager = Predictor(ModelSpec.random(args.config).load(), device="cuda", fast=False)
    eager_embedding = eager.embed(image)
    top_kernels(lambda: eager._decode(eager_embedding, None, None, box, None, False), args.out, rows=25)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["encoder", "decoder"])
    parser.add_argument("--config", default="lightening_t")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="encoder weights")
    parser.add_argument("--batch", type=int, default=1, help="encoder batch")
    parser.add_argument("--fp32-decoder", action="store_true", help="decoder in float32 (no autocast casts)")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    (profile_encoder if args.part == "encoder" else profile_decoder)(args)


if __name__ == "__main__":
    main()

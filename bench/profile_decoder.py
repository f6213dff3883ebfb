"""Where prompt -> mask time goes on a GPU: top CUDA kernels of the decoder path, and its graph replay time.

    python bench/profile_decoder.py [--cudnn-benchmark] --out $OUT/profile-decoder.txt
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from samlight.models import random_model
from samlight.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="lightening_t")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--fp32-decoder", action="store_true", help="decoder in float32 (no autocast casts)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    predictor = Predictor(random_model(args.config), device="cuda", autocast=not args.fp32_decoder)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    embedding = predictor.embed(image)
    box = np.array([[100.0, 80.0, 400.0, 360.0]])
    decode = lambda: predictor._decode(embedding, None, None, box, None, False)  # noqa: E731
    for _ in range(5):
        decode()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    print(f"decode (graphed) median {statistics.median(times):.3f} ms, cudnn.benchmark={args.cudnn_benchmark}, "
          f"decoder {'fp32' if args.fp32_decoder else 'bf16 autocast'}")
    eager = Predictor(random_model(args.config), device="cuda", fast=False)
    emb2 = eager.embed(image)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            eager._decode(emb2, None, None, box, None, False)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

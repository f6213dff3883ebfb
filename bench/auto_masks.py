"""Automatic masks (pre-annotation) throughput: images per second in one process, as a worker computes them.

Per image, what one pre-annotation job costs (``serving.jobs.execute`` with an ``AutoSpec``): the encoder
(batch 1), the grid's prompts in large decoder batches, the thresholds and box NMS on the low-resolution
logits, upsampling of the kept masks, and the outputs the project asks for (brush RLE on the model's device
by default). Images are COCO photos resized to each size and held in memory (no download).

Two filter settings: SAM's defaults (predicted IoU 0.88, stability 0.95; with random weights few masks pass,
so this is the decoder's cost), and every mask passing (thresholds 0: up to ``max_masks`` = 200 masks per
image, the upsampling and outputs' worst case, closer to what a trained model keeps on busy photos).

Prints a table and writes JSON (device name, date, settings, per-size rows).

    python bench/auto_masks.py --device cuda --model random:lightening_t --images DIR --out OUT.json
    python bench/auto_masks.py --device cpu --threads 2 --images DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def resized(path: Path, width: int, height: int):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC))


class InMemory:
    """The job's fetcher: images by URL from memory."""

    def __init__(self, images: dict) -> None:
        self.images = images

    def fetch(self, url: str):
        return self.images[url]


def measure(served, images: dict, spec, output, synchronize, warm: int) -> dict:
    from serving.jobs import SegmentJob, execute

    fetcher = InMemory(images)
    urls = list(images)
    per_image, steps, masks = [], {}, []
    for i, url in enumerate(urls):
        served.predictor.cache.clear()
        synchronize()
        started = time.perf_counter()
        result = execute(SegmentJob(url, url, auto=spec, output=output), served.predictor, fetcher)
        synchronize()
        elapsed = (time.perf_counter() - started) * 1000
        if i < warm:  # CUDA graphs, autotuning, first allocations
            continue
        per_image.append(elapsed)
        masks.append(len(result["objects"]))
        for name, value in result["timings_ms"].items():
            steps.setdefault(name, []).append(value)
    total_s = sum(per_image) / 1000
    return {"images": len(per_image), "img_per_s": round(len(per_image) / total_s, 2),
            "p50_ms": round(statistics.median(per_image), 2), "max_ms": round(max(per_image), 2),
            "masks_per_image": round(statistics.mean(masks), 1),
            "steps_ms": {k: round(statistics.median(v), 2) for k, v in steps.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="random:lightening_t", help="a samlight.models spec")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "coco_tiny" / "val2017")
    parser.add_argument("--count", type=int, default=22, help="images per setting, warm-up included")
    parser.add_argument("--warm", type=int, default=2, help="images that warm up (CUDA graphs, allocations)")
    parser.add_argument("--batch", type=int, default=256, help="grid prompts per decoder call")
    parser.add_argument("--sizes", default="640x480,1024x1024")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--outputs", default="brush", help="comma-separated: brush, polygon, box")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cpu-fast", action="store_true", help="bf16 + compiled encoder on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from samlight.models import ModelSpec
    from serving.automatic import AutoSpec
    from serving.engine import ModelHolder, PredictorSettings
    from serving.jobs import OutputSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    spec = ModelSpec.parse(args.model)
    model, version = spec.load(), spec.version
    served = ModelHolder(PredictorSettings(device=args.device, cpu_fast=args.cpu_fast), 0).build(model, version)
    kinds = set(args.outputs.split(","))
    output = OutputSpec(brush="brush" in kinds, polygon="polygon" in kinds, box="box" in kinds)
    paths = sorted(args.images.glob("*.jpg"))[: args.count]
    grid = {"points_per_side": args.points_per_side, "batch": args.batch}
    filters = {"SAM defaults (0.88 / 0.95)": AutoSpec(**grid),
               "all pass (0 / 0, <= 200 masks)": AutoSpec(**grid, pred_iou=0, stability=0)}
    rows = []
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        images = {f"{p.name}@{size}": resized(p, width, height) for p in paths}
        for name, auto in filters.items():
            row = {"size": size, "filters": name, **measure(served, images, auto, output, synchronize, args.warm)}
            rows.append(row)
            print(f"{size:>10} {name:32s} {row['img_per_s']:8.2f} img/s  p50 {row['p50_ms']:8.2f} ms  "
                  f"{row['masks_per_image']:6.1f} masks  {row['steps_ms']}", flush=True)
    device_name = torch.cuda.get_device_name() if on_cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = {"benchmark": "automatic masks", "device": device_name, "date": datetime.datetime.now().isoformat(),
              "torch": torch.__version__, "model": args.model, "version": version,
              "points_per_side": args.points_per_side, "decoder_batch": args.batch, "outputs": sorted(kinds), "cpu_fast": args.cpu_fast,
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

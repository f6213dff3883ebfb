"""The compiled bulk decoder against the graphed one on CUDA: the same grid's masks (IoU) and scores, and the
time of one 32×32 grid (4 batches of 256, three masks each, with SAM's stability score) each way, after
warm-up, with inductor's defaults and with the coordinate-descent tuning the decoder uses.

    python bench/bulk_decoder_check.py [--images DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import numpy as np
    import torch
    from segment_anything.utils.amg import build_point_grid

    from segment_anything.utils.amg import calculate_stability_score

    from samlight.graphed_decoder import CompiledBulkDecoder
    from samlight.image_io import load_image
    from samlight.models import ModelSpec
    from serving.engine import ModelHolder, PredictorSettings

    images = Path(sys.argv[sys.argv.index("--images") + 1]) if "--images" in sys.argv else REPO / ".bench-data/val2017"
    spec = ModelSpec.parse("random:lightening_t")
    predictor = ModelHolder(PredictorSettings(device="cuda"), 0).build(spec.load(), spec.version).predictor
    image = load_image(sorted(images.glob("*.jpg"))[0])
    embedding = predictor.embed(image)
    h, w = image.shape[:2]
    grid = build_point_grid(32) * np.array([w, h])
    batches = [grid[i:i + 256, None, :] for i in range(0, len(grid), 256)]
    ones = np.ones((256, 1), dtype=np.int64)

    def run(bulk: bool):
        """Per batch: (low-res logits, IoU, stability), the compiled decoder's or the graphed one's + SAM's score."""
        if bulk:
            return [predictor.decode_grid(embedding, b) for b in batches]
        out = [predictor.decode(embedding, b, ones[: len(b)], multimask_output=True) for b in batches]
        return [(low, iou, calculate_stability_score(low, 0.0, 1.0)) for low, iou in out]

    def timed(what: str, bulk: bool) -> None:
        started = time.perf_counter()
        run(bulk)
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(5):
            run(bulk)
        torch.cuda.synchronize()
        print(f"{what:28s}: {(time.perf_counter() - started) / 5 * 1000:7.2f} ms per 32x32 grid "
              f"(first: {first:.1f} s)", flush=True)

    timed("graphed (eager kernels)", False)
    variants = {"inductor defaults": {"options": {}}, "coordinate descent tuning (default)": {}}
    for name, chosen in variants.items():
        torch._dynamo.reset()  # compiled code is cached per function: each variant compiles afresh
        predictor._bulk_decoder = CompiledBulkDecoder(predictor.model, **chosen)
        timed(f"compiled, {name}", True)
    torch._dynamo.reset()
    predictor._bulk_decoder = CompiledBulkDecoder(predictor.model)
    graphed, compiled = run(False), run(True)
    a = torch.cat([g[0] for g in graphed]) > 0
    b = torch.cat([c[0] for c in compiled]) > 0
    inter, union = (a & b).flatten(2).sum(-1).float(), (a | b).flatten(2).sum(-1).float()
    iou = (inter / union.clamp(min=1))[union > 0]
    scores = (torch.cat([g[1] for g in graphed]) - torch.cat([c[1] for c in compiled])).abs()
    stability = (torch.cat([g[2] for g in graphed]) - torch.cat([c[2] for c in compiled])).abs()
    print(f"mask IoU compiled vs graphed: mean {iou.mean():.4f} min {iou.min():.4f}; max score diff {scores.max():.4f}; "
          f"stability diff mean {stability.mean():.4f} max {stability.max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""On a GPU: the serving fast paths (bf16 CUDA-graph encoder with the Triton kernel, graphed decoder)
against the plain float32 eager model, on real COCO photos. Prints a table, writes JSON.

    python bench/fast_path_check.py --images DIR --out results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch

from samlight.image_io import load_image
from samlight.models import ModelSpec
from samlight.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--config", default="lightening_t")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fast = Predictor(ModelSpec.random(args.config).load(), device="cuda")  # bf16 graphs, Triton attention
    exact = Predictor(ModelSpec.random(args.config).load(), device="cuda", fast=False, autocast=False)  # fp32 eager
    exact.model.image_encoder.apply(lambda m: setattr(m, "backend", "torch_cuda") if hasattr(m, "backend") else None)
    rows = []
    rng = np.random.default_rng(0)
    for path in sorted(Path(args.images).glob("*.jpg"))[: args.count]:
        image = load_image(path)
        h, w = image.shape[:2]
        a, b = fast.embed(image), exact.embed(image)
        cosine = torch.nn.functional.cosine_similarity(a.features.flatten(), b.features.flatten(), dim=0).item()
        rel = ((a.features - b.features).norm() / b.features.norm()).item()
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        box = np.array([x0, y0, x0 + w / 3, y0 + h / 3])
        pf, pe = fast.predict_embedding(a, box=box), exact.predict_embedding(b, box=box)
        point = np.array([[w / 2, h / 2]])
        qf = fast.predict_embedding(a, point, np.array([1]), multimask_output=False)
        qe = exact.predict_embedding(b, point, np.array([1]), multimask_output=False)
        rows.append({"image": path.name, "embedding_cosine": cosine, "embedding_rel_err": rel,
                     "box_mask_agreement": float((pf.masks == pe.masks).mean()),
                     "box_score_max_diff": float(np.abs(pf.scores - pe.scores).max()),
                     "point_mask_agreement": float((qf.masks == qe.masks).mean())})
    for r in rows:
        print(f"{r['image']:<20} cos {r['embedding_cosine']:.5f} rel {r['embedding_rel_err']:.2e} "
              f"box agree {r['box_mask_agreement']:.4f} point agree {r['point_mask_agreement']:.4f}")
    payload = {"kind": "fast-path-check", "date": dt.datetime.now(dt.timezone.utc).isoformat(),
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
               "rows": rows}
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

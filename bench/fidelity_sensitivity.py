"""How much mask fidelity an embedding error of a given size costs: the teacher's own embedding of each held-out
photo, plus isotropic Gaussian noise scaled to a target cosine, decoded by the teacher's own decoder, against the
clean embedding's masks (``samlight eval --teacher``'s protocol: each instance's box or first click, the best of
three masks by predicted IoU). A student's error is not isotropic, so this is what a cosine buys at best when the
decoder is the teacher's; it also reports the teacher's mask-logit sizes (random weights give logits near zero,
where small embedding errors flip many pixels).

    python bench/fidelity_sensitivity.py --data COCO_TINY [--teacher random:vit_b] [--images 6] --out OUT.json

Prints a table; writes OUT.json and OUT.png (fidelity vs cosine).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samlight.distill import coco_dataset  # noqa: E402
from samlight.eval.fidelity import PROMPTS, _prompts  # noqa: E402
from samlight.eval.protocol import _best, mask_iou  # noqa: E402
from samlight.models import ModelSpec  # noqa: E402
from samlight.predictor import Prediction, Predictor  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="coco_tiny root (its first val images are used)")
    p.add_argument("--teacher", default="random:vit_b")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--cosines", type=float, nargs="+", default=[0.95, 0.97, 0.98, 0.99, 0.995])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--out", required=True, help="JSON path; the plot goes beside it (.png)")
    return p.parse_args(argv)


def perturbed(features: torch.Tensor, cosine: float, generator: torch.Generator) -> torch.Tensor:
    """``features`` plus isotropic noise n scaled so that cos(features, features + a·n) = cosine (n ⟂ features
    in expectation: cos = 1 / sqrt(1 + a²|n|²/|f|²))."""
    noise = torch.randn(features.shape, generator=generator)
    scale = float(np.sqrt(1 / cosine**2 - 1) * features.norm() / noise.norm())
    return features + scale * noise


def batched(prediction: Prediction) -> Prediction:
    """A prediction with its prompt axis (``Predictor`` drops it for a single prompt)."""
    if prediction.scores.ndim == 2:
        return prediction
    return Prediction(prediction.masks[None], prediction.scores[None], prediction.low_res_logits[None])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = coco_dataset(Path(args.data) / "annotations" / "instances_val2017.json", max_images=args.images)
    predictor = Predictor(ModelSpec.parse(args.teacher).load(), device="cpu")
    photos = [(s, image, predictor.embed(image)) for s in samples for image in [s.load_image()]]
    # the clean embeddings' answers, once: (photo, its prompts, the best masks, the chosen index) per prompt kind
    threshold = predictor.model.mask_threshold
    clean_answers, logits = {}, []
    for prompt in PROMPTS:
        clean_answers[prompt] = []
        for sample, image, clean in photos:
            prompts = _prompts(sample, image.shape[:2], prompt)
            want = batched(predictor.predict_embedding(clean, multimask_output=True, return_logits=True, **prompts))
            logits.append(np.abs(want.masks).ravel()[::97])
            best = _best(dataclasses.replace(want, masks=want.masks > threshold))[0]
            clean_answers[prompt].append((clean, prompts, best, want.scores.argmax(1)))
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for cosine in args.cosines:
        row = {"cosine": cosine}
        for prompt in PROMPTS:
            ious, agree = [], []
            for clean, prompts, want_best, want_choice in clean_answers[prompt]:
                noisy = dataclasses.replace(clean, features=perturbed(clean.features, cosine, generator))
                got = batched(predictor.predict_embedding(noisy, multimask_output=True, **prompts))
                ious.extend(mask_iou(a, b) for a, b in zip(_best(got)[0], want_best))
                agree.extend(got.scores.argmax(1) == want_choice)
            row[f"{prompt}_iou"] = float(np.mean(ious))
            row[f"{prompt}_same_choice"] = float(np.mean(agree))
            row["prompts"] = len(ious)
        rows.append(row)
        print(json.dumps(row), flush=True)
    magnitudes = np.concatenate(logits)
    result = {
        "date": datetime.date.today().isoformat(), "device": "cpu", "teacher": args.teacher,
        "images": len(photos), "rows": rows,
        "teacher_abs_logit": {"median": float(np.median(magnitudes)), "p90": float(np.quantile(magnitudes, 0.9)),
                              "share_below_1": float((magnitudes < 1).mean())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'cosine':>8} {'box IoU':>8} {'click IoU':>9}   teacher |logit| median "
          f"{result['teacher_abs_logit']['median']:.3f}")
    for row in rows:
        print(f"{row['cosine']:>8} {row['box_iou']:>8.3f} {row['point_iou']:>9.3f}")
    plot(rows, args.teacher, out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], teacher: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cosines = [r["cosine"] for r in rows]
    for prompt, colour in (("box", "tab:blue"), ("point", "tab:orange")):
        ax.plot(cosines, [r[f"{prompt}_iou"] for r in rows], "o-", color=colour, label=f"{prompt} prompt")
    ax.axhline(0.93, color="tab:blue", linestyle=":", linewidth=1, label="box target 0.93")
    ax.set_xlabel("embedding cosine to the teacher (isotropic noise)")
    ax.set_ylabel("mask IoU to the teacher")
    ax.set_title(f"{teacher}: fidelity an embedding error allows", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Eval outputs: a printed table, a JSON file, and a PNG grid of examples."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from samlight.eval.protocol import ImageResult


def table(result: dict) -> str:
    rows = [("model", str(result.get("model", "?"))), ("prompt", result["prompt"] + (
        f" ({result['clicks']} clicks)" if result.get("clicks") else ""))]
    rows.append(("images / instances", f"{result['images']} / {result['instances']}"))
    rows.append(("mIoU", f"{result['miou']:.4f}"))
    for name, part in result["by_size"].items():
        value = "-" if part["miou"] is None else f"{part['miou']:.4f}"
        rows.append((f"mIoU {name}", f"{value}  ({part['instances']})"))
    if result.get("per_click_miou"):
        rows.append(("mIoU per click", " ".join(f"{v:.3f}" for v in result["per_click_miou"])))
    fid = result.get("fidelity")
    if fid:
        rows.append(("teacher", str(fid.get("teacher"))))
        rows.append(("mask IoU vs teacher", f"{fid['mask_iou']:.4f}  ({fid['prompts']} prompts)"))
        rows.append(("embedding cosine", f"{fid['embedding_cosine']:.4f}"))
        rows.append(("embedding rel. MSE", f"{fid['embedding_rel_mse']:.4f}"))
    same = result.get("vs_fp32")
    if same:
        precision = result.get("precision")
        rows.append((f"mask IoU {precision} vs fp32", f"{same['mask_iou']:.4f}  ({same['prompts']} prompts)"))
        rows.append((f"embedding cosine {precision} vs fp32", f"{same['embedding_cosine']:.4f}"))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(result: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in result.items() if k != "examples"}
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(clean, indent=2, sort_keys=True))
    os.replace(temp, path)


def example_grid(examples: list[ImageResult], path: str | os.PathLike, title: str = "", columns: int = 3) -> None:
    """Each example image with its predicted masks, GT boxes or clicks, and its mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from samlight.overlay import overlay

    if not examples:
        raise ValueError("no examples to draw")
    columns = min(columns, len(examples))
    rows = math.ceil(len(examples) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, ex in zip(axes.flat, examples):
        points = np.concatenate(ex.points) if ex.points else None
        labels = np.concatenate(ex.labels) if ex.labels else None
        boxes = np.stack(ex.boxes) if ex.boxes else None
        ax.imshow(overlay(ex.image, ex.masks, points, labels, boxes))
        ax.set_title(f"{ex.name}  mIoU {np.mean(ex.ious):.3f} ({len(ex.ious)})", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)

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
        mode = "chained" if result.get("chained") else "not chained"
        rows.append((f"mIoU per click ({mode})", " ".join(f"{v:.3f}" for v in result["per_click_miou"])))
        if result.get("per_click_fidelity"):
            rows.append(("IoU vs teacher per click", " ".join(f"{v:.3f}" for v in result["per_click_fidelity"])))
    other = result.get("other_mode")
    if other:
        mode = "chained" if other.get("chained") else "not chained"
        rows.append((f"mIoU per click ({mode})", " ".join(f"{v:.3f}" for v in other["per_click_miou"])))
        if other.get("per_click_fidelity"):
            rows.append((f"IoU vs teacher ({mode})", " ".join(f"{v:.3f}" for v in other["per_click_fidelity"])))
    fid = result.get("fidelity")
    if fid:
        rows.append(("teacher", str(fid.get("teacher"))))
        rows.append(("mask IoU vs teacher", f"{fid['mask_iou']:.4f}  ({fid['prompts']} prompts: "
                                            f"{fid.get('mask_iou_prompt', 'box')})"))
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


def click_curve(results: dict[bool, dict], path: str | os.PathLike, title: str = "") -> None:
    """mIoU (and IoU to the teacher) after each click, chained (previous mask as input) and not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for chained, result in sorted(results.items(), reverse=True):
        mode = "chained" if chained else "not chained"
        clicks = range(1, len(result["per_click_miou"]) + 1)
        ax.plot(clicks, result["per_click_miou"], marker="o", linestyle="-" if chained else "--",
                color="tab:blue", label=f"mIoU to ground truth, {mode}")
        if result.get("per_click_fidelity"):
            ax.plot(clicks, result["per_click_fidelity"], marker="s", linestyle="-" if chained else "--",
                    color="tab:orange", label=f"IoU to the teacher, {mode}")
    ax.set_xlabel("click")
    ax.set_ylabel("IoU")
    ax.set_xticks(list(clicks))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

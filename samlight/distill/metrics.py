"""Training metrics as JSON lines, and PNG plots of the losses and the dynamic layer weights."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only JSONL; on resume, records at or after the resumed (stage, step) are dropped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_from(self, stage: str, step: int, stage_order: tuple[str, ...] = ("encoder", "decoder")) -> None:
        if not self.path.exists():
            return
        cut = (stage_order.index(stage), step)
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                if (stage_order.index(record["stage"]), record["step"]) < cut:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line torn by a kill
        temp = self.path.with_suffix(".tmp")
        temp.write_text("".join(line + "\n" for line in kept))
        os.replace(temp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def plot_metrics(records: list[dict], directory: str | os.PathLike) -> list[Path]:
    """losses.png (both stages) and layer_weights.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    encoder = [r for r in records if r.get("stage") == "encoder"]
    decoder = [r for r in records if r.get("stage") == "decoder"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if encoder:
        steps = [r["step"] for r in encoder]
        axes[0].plot(steps, [r["loss"] for r in encoder], label="total", color="black")
        axes[0].plot(steps, [r["neck_loss"] for r in encoder], label="neck")
        if any(r.get("output_loss") for r in encoder):  # only when the output loss is on
            axes[0].plot(steps, [r["output_loss"] for r in encoder], "--", label="output (masks)", color="tab:red")
        for i in range(len(encoder[0]["layer_losses"])):
            axes[0].plot(steps, [r["layer_losses"][i] for r in encoder], label=f"block {i + 1}", alpha=0.6)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
    axes[0].set_title("encoder stage (relative MSE)")
    axes[0].set_xlabel("step")
    if decoder:
        steps = [r["step"] for r in decoder]
        for name in ("loss", "teacher_loss", "gt_loss", "iou_loss", "teacher_iou", "gt_iou"):
            if all(name in r for r in decoder):  # teacher_iou: not in logs of runs before 2026-12-03
                style = "--" if name.endswith("_iou") else "-"
                axes[1].plot(steps, [r[name] for r in decoder], style, label=name)
        axes[1].legend(fontsize=7)
    axes[1].set_title("decoder stage")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(directory / "losses.png", dpi=100)
    plt.close(fig)
    written.append(directory / "losses.png")
    if encoder:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in encoder]
        for i in range(len(encoder[0]["layer_weights"])):
            ax.plot(steps, [r["layer_weights"][i] for r in encoder], label=f"block {i + 1}")
        ax.set_title("dynamic layer weights")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / "layer_weights.png", dpi=100)
        plt.close(fig)
        written.append(directory / "layer_weights.png")
    return written

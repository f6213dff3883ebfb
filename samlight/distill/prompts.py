"""Prompts for training: sampled from masks for decoder alignment (jittered boxes, positive and negative points),
and random label-free ones for the encoder stage's output loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samlight.distill.data import mask_box

MIN_AREA = 16  # pixels; smaller instances make no useful prompt


@dataclass
class SampledPrompts:
    """Pixel prompts of the original image. ``*_gt`` index the image's masks (-1: no ground truth)."""

    boxes: np.ndarray  # (Kb, 4)
    box_gt: np.ndarray  # (Kb,)
    points: np.ndarray  # (Kp, 2, 2): one positive point, one negative or padding point
    labels: np.ndarray  # (Kp, 2): 1 positive, 0 negative, -1 padding (SAM's "not a point")
    point_gt: np.ndarray  # (Kp,)


def jitter_box(box: np.ndarray, size: tuple[int, int], rng: np.random.Generator, amount: float,
               max_pixels: float = 20.0) -> np.ndarray:
    """Each edge moved by N(0, amount * side), at most ``max_pixels`` (SAM's training recipe)."""
    w, h = box[2] - box[0], box[3] - box[1]
    noise = rng.normal(0, 1, 4) * amount * np.array([w, h, w, h])
    noise = np.clip(noise, -max_pixels, max_pixels)
    out = box + noise
    height, width = size
    out = np.clip(out, 0, [width, height, width, height])
    if out[2] - out[0] < 1 or out[3] - out[1] < 1:
        return box.copy()
    return out


def _point_in(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    i = rng.integers(len(xs))
    return np.array([xs[i] + 0.5, ys[i] + 0.5])


def sample_prompts(masks: list[np.ndarray], size: tuple[int, int], rng: np.random.Generator, max_instances: int,
                   box_fraction: float = 0.5, jitter: float = 0.1, negative_fraction: float = 0.5,
                   boxes_without_masks: list | None = None) -> SampledPrompts:
    """Prompts for up to ``max_instances`` masks; with no masks, the given boxes (jittered) or random clicks,
    aligned to the teacher only."""
    height, width = size
    usable = [i for i, m in enumerate(masks) if m.sum() >= MIN_AREA]
    boxes, box_gt, points, labels, point_gt = [], [], [], [], []
    if usable:
        chosen = rng.permutation(usable)[:max_instances]
        for i in chosen:
            mask = masks[i]
            box = mask_box(mask)
            if rng.random() < box_fraction:
                boxes.append(jitter_box(box, size, rng, jitter))
                box_gt.append(i)
                continue
            positive = _point_in(mask, rng)
            negative = None
            if rng.random() < negative_fraction:
                # a background pixel near the object: inside its box grown by 10%
                grow = 0.1 * np.array([-(box[2] - box[0]), -(box[3] - box[1]), box[2] - box[0], box[3] - box[1]])
                x0, y0, x1, y1 = np.clip(box + grow, 0, [width, height, width, height]).astype(int)
                around = np.zeros_like(mask)
                around[y0:y1, x0:x1] = True
                negative = _point_in(around & ~mask, rng)
            points.append([positive, negative if negative is not None else np.zeros(2)])
            labels.append([1, 0 if negative is not None else -1])
            point_gt.append(i)
    elif boxes_without_masks:
        for i in rng.permutation(len(boxes_without_masks))[:max_instances]:
            box = np.asarray(boxes_without_masks[i], dtype=np.float64)
            if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                boxes.append(jitter_box(box, size, rng, jitter))
                box_gt.append(-1)
    else:
        # no ground truth: random foreground clicks, aligned to the teacher only
        for _ in range(max_instances):
            points.append([np.array([rng.uniform(0, width), rng.uniform(0, height)]), np.zeros(2)])
            labels.append([1, -1])
            point_gt.append(-1)
    return SampledPrompts(
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
        box_gt=np.array(box_gt, dtype=np.int64),
        points=np.array(points, dtype=np.float64).reshape(-1, 2, 2),
        labels=np.array(labels, dtype=np.int64).reshape(-1, 2),
        point_gt=np.array(point_gt, dtype=np.int64),
    )


def random_prompts(input_sizes: list[tuple[int, int]], per_image: int, generator: torch.Generator) -> list[dict]:
    """Label-free prompts in the model's input frame, uniform over each image's (h, w): ``per_image // 2`` boxes of
    5-100 % of each side, the rest single positive clicks; made on the generator's device (scaled by Python
    numbers: nothing is copied from the host). In :func:`samlight.distill.trainer.decode`'s format."""
    device = generator.device
    boxes_n = per_image // 2
    points_n = per_image - boxes_n
    uniform = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    prompts = []
    for h, w in input_sizes:
        extent = 0.05 + 0.95 * uniform(boxes_n, 2)  # as shares of the sides
        corner = uniform(boxes_n, 2) * (1 - extent)
        far = corner + extent
        box = torch.stack([corner[:, 0] * w, corner[:, 1] * h, far[:, 0] * w, far[:, 1] * h], dim=1)
        click = uniform(points_n, 1, 2)
        click = torch.stack([click[..., 0] * w, click[..., 1] * h], dim=-1)
        prompts.append({
            "box": {"boxes": box} if boxes_n else None,
            "point": {"points": click,
                      "labels": torch.ones(points_n, 1, dtype=torch.int64, device=device)} if points_n else None,
        })
    return prompts

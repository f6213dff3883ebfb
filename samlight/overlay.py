"""Pictures of masks and prompts for people to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(30, 144, 255), (255, 99, 71), (50, 205, 50), (255, 215, 0), (186, 85, 211), (0, 206, 209)]


def overlay(
    image: np.ndarray,
    masks: list[np.ndarray],
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The image with each mask tinted, boxes outlined, positive points green and negative red."""
    canvas = image.astype(np.float32)
    for i, mask in enumerate(masks):
        color = np.array(COLORS[i % len(COLORS)], dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - alpha) + color * alpha
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, round(max(image.shape[:2]) / 150))
    for box in [] if boxes is None else np.asarray(boxes).reshape(-1, 4):
        draw.rectangle([float(v) for v in box], outline=(255, 255, 0), width=max(2, radius // 2))
    for (x, y), label in zip([] if points is None else points, [] if labels is None else labels):
        fill = (0, 255, 0) if label else (255, 0, 0)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
    return picture

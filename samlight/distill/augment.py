"""Random views of a training image for the encoder stage: a crop (zooming in), a flip, a colour change.

A few hundred project images are a small sample of the teacher's behaviour; views of them multiply it. The
teacher sees the same view as the student, so its features are computed on the fly for augmented images (a
view is never seen twice, so it is not cached). A view is drawn on the CPU from a seeded generator (a resumed
run draws the same ones) and applied on the training device to the prepared image, so the data loader does
no pixel work for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

MIN_CROP = 0.5  # a crop keeps at least half of each side: objects get up to 2x larger
COLOUR = 0.2  # brightness and contrast change by up to +-20%


@dataclass(frozen=True)
class View:
    top: int
    left: int
    height: int
    width: int
    flip: bool
    contrast: float
    brightness: float  # in pixel values (0..255)


def sample_view(input_size: tuple[int, int], rng: np.random.Generator) -> View:
    """A random view of the valid (unpadded) ``input_size`` region of a prepared image."""
    height, width = input_size
    crop_h = max(1, round(height * rng.uniform(MIN_CROP, 1.0)))
    crop_w = max(1, round(width * rng.uniform(MIN_CROP, 1.0)))
    return View(top=int(rng.integers(0, height - crop_h + 1)), left=int(rng.integers(0, width - crop_w + 1)),
                height=crop_h, width=crop_w, flip=bool(rng.random() < 0.5),
                contrast=float(rng.uniform(1 - COLOUR, 1 + COLOUR)), brightness=float(rng.uniform(-COLOUR, COLOUR) * 255))


def apply_view(pixels: torch.Tensor, view: View) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, S, S) prepared pixels -> the view, resized to longest side S and zero padded as SAM does (float,
    0..255), and its new input size."""
    size = pixels.shape[-1]
    crop = pixels[:, view.top : view.top + view.height, view.left : view.left + view.width].float()
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(view.height, view.width, size)
    crop = F.interpolate(crop[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    if view.flip:
        crop = crop.flip(-1)
    mean = crop.mean()
    crop = ((crop - mean) * view.contrast + mean + view.brightness).clamp(0, 255)
    out = torch.zeros(3, size, size, dtype=torch.float32, device=pixels.device)
    out[:, :new_h, :new_w] = crop
    return out, (new_h, new_w)

"""Random views of a training image for the encoder stage: a flip, a crop (zooming in), a colour change.

A few hundred project images are a small sample of the teacher's behaviour; views of them multiply it. The
teacher sees the same view as the student, so its features are computed on the fly for augmented images
(a view is never seen twice, so it is not cached).
"""

from __future__ import annotations

import numpy as np

MIN_CROP = 0.5  # a crop keeps at least half of each side: objects get up to 2x larger
COLOUR = 0.2  # brightness and contrast change by up to +-20%


def random_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A horizontally flipped (half the time), cropped and recoloured copy of an RGB uint8 image."""
    height, width = image.shape[:2]
    crop_h = max(1, round(height * rng.uniform(MIN_CROP, 1.0)))
    crop_w = max(1, round(width * rng.uniform(MIN_CROP, 1.0)))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    view = image[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    contrast = rng.uniform(1 - COLOUR, 1 + COLOUR)
    brightness = rng.uniform(-COLOUR, COLOUR) * 255
    mean = view.mean()
    return np.clip((view - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)

"""A test-only stand-in for the model whose masks are known in advance (``SAMLIGHT_TEST_MODEL=geometry``).

With random weights a mask's content is arbitrary, so a test cannot check that a prompt landed where the
annotator put it. The geometry predictor answers a box with exactly that box and a point with a disc around
it (negative points cut their disc out), through the same job executor, RLE encoder and HTTP protocol as the
real model. It never serves real users: it is selected only by that variable and is loudly logged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

GEOMETRY = "geometry"
SCORE = 0.9  # every geometry mask's predicted quality (below 1, so score thresholds can be tested)


@dataclass(frozen=True)
class GeometryEmbedding:
    original_size: tuple[int, int]  # (H, W)


class _Cache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, GeometryEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str):
        with self._lock:
            entry = self._entries.get(key)
            self.hits += entry is not None
            self.misses += entry is None
            return entry

    def put(self, key: str, value) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}


def point_radius(height: int, width: int) -> float:
    return max(4.0, 0.05 * min(height, width))


class GeometryPredictor:
    """Duck-types the parts of ``samlight.predictor.Predictor`` that ``serving.jobs.execute`` uses."""

    device = "cpu"

    def __init__(self) -> None:
        self.cache = _Cache()

    def embed(self, image: np.ndarray, key: str) -> GeometryEmbedding:
        embedding = GeometryEmbedding(tuple(image.shape[:2]))
        self.cache.put(key, embedding)
        return embedding

    def is_cached(self, key: str) -> bool:
        return key in self.cache

    def predict_best(self, embedding: GeometryEmbedding, point_coords=None, point_labels=None, box=None,
                     mask_input=None, multimask_output: bool = False):
        """K prompts' masks (K, H, W), scores and stand-in logits, as ``Predictor.predict_best``; a refined
        prompt (``mask_input``) adds its new points to the previous mask."""
        import torch

        height, width = embedding.original_size
        if point_coords is None and box is None:
            raise ValueError("give at least one prompt: points or a box")
        count = len(box) if box is not None else len(point_coords)
        yy, xx = np.mgrid[:height, :width] + 0.5  # pixel centres
        radius = point_radius(height, width)
        masks = np.zeros((count, height, width), bool)
        for k in range(count):
            mask = masks[k]
            if box is not None:
                x0, y0, x1, y1 = np.asarray(box[k], float)
                mask |= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            if mask_input is not None:
                mask |= mask_input[k].numpy()
            if point_coords is not None:
                for (x, y), label in zip(np.asarray(point_coords[k], float), np.asarray(point_labels[k])):
                    disc = (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
                    if label == 1 and box is None:
                        mask |= disc
                    elif label == 0:
                        mask &= ~disc
        masks = torch.from_numpy(masks)
        return masks, [SCORE] * count, masks.clone()  # the "logits" of a geometry mask: the mask itself

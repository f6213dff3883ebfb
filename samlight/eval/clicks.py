"""Simulated clicks: the first at the point farthest from the mask boundary, then one per round at
the centre of the largest error region (positive on a missed part, negative on a false positive)."""

from __future__ import annotations

import cv2
import numpy as np


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each mask pixel to the nearest pixel outside it; the image border
    counts as outside (the mask is padded with a ring of background)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance[1:-1, 1:-1]


def farthest_point(mask: np.ndarray) -> np.ndarray | None:
    """(x, y) pixel centre of the mask pixel farthest from its boundary; None for an empty mask."""
    if not mask.any():
        return None
    distance = distance_to_boundary(mask)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([x + 0.5, y + 0.5])


def _largest_region(error: np.ndarray) -> tuple[int, np.ndarray | None]:
    if not error.any():
        return 0, None
    count, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return int(stats[best, cv2.CC_STAT_AREA]), labels == best


def next_click(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The corrective click for ``prediction`` vs ``truth``: ((x, y), label) or None if they agree."""
    missed_area, missed = _largest_region(truth & ~prediction)
    extra_area, extra = _largest_region(prediction & ~truth)
    if missed is None and extra is None:
        return None
    if missed_area >= extra_area:
        return farthest_point(missed), 1
    return farthest_point(extra), 0

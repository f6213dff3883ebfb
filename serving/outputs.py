"""A mask in the forms Label Studio's controls take, computed where the mask is (the worker, or the embedded
backend; ``serving.jobs.OutputSpec`` says which): cleaned up, as polygons, as its tight box. Pixels here;
``serving.labelstudio`` writes them as Label Studio regions (percent).

Label Studio's polygons have no holes: a part's polygon is its outer contour, so a hole larger than the
clean-up threshold is filled in the polygon (the brush output keeps it).
"""

from __future__ import annotations

import cv2
import numpy as np
from segment_anything.utils.amg import remove_small_regions

MAX_POLYGON_PARTS = 100  # a noisy mask can have thousands of specks; an annotator never wants them all


def clean(mask: np.ndarray, min_area: int, largest_only: bool) -> np.ndarray:
    """Fill holes and remove islands smaller than ``min_area`` pixels (SAM's own post-processing), and keep only
    the largest connected part if asked. An empty mask stays empty; a mask of only small specks keeps its
    largest one (as ``remove_small_regions`` does)."""
    if min_area > 0:
        mask, _ = remove_small_regions(mask, min_area, mode="holes")
        mask, _ = remove_small_regions(mask, min_area, mode="islands")
    if largest_only and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count > 2:
            mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return mask


def polygons(mask: np.ndarray, tolerance: float, min_area: int, largest_only: bool) -> list[list[list[float]]]:
    """The outer contour of each connected part, largest first, simplified to ``tolerance`` pixels; parts
    smaller than ``min_area`` are dropped (the largest part always stays). Vertices are pixel centres."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # cv2's contour area of a one-pixel-wide part is 0: count its pixels' boxes instead, as a floor
    parts = sorted(((max(cv2.contourArea(c), float(len(c))), c) for c in contours), key=lambda p: -p[0])
    result = []
    for index, (area, contour) in enumerate(parts):
        if index > 0 and (largest_only or area < min_area or len(result) >= MAX_POLYGON_PARTS):
            break
        simplified = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
        points = simplified.reshape(-1, 2).astype(np.float64) + 0.5
        if len(points) < 3:  # a line or a dot: its box as a polygon
            x0, y0 = contour.reshape(-1, 2).min(0)
            x1, y1 = contour.reshape(-1, 2).max(0) + 1
            points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        result.append(points.tolist())
    return result


def tight_box(mask: np.ndarray) -> list[float] | None:
    """``[x0, y0, x1, y1]`` in pixel edges (x1, y1 exclusive), or None for an empty mask."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(xs) == 0:
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]

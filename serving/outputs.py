"""A mask in the forms Label Studio's controls take, computed where the mask is (the worker, or the embedded
backend; ``serving.jobs.OutputSpec`` says which): cleaned up, as polygons, as its tight box. Pixels here;
``serving.labelstudio`` writes them as Label Studio regions (percent).

Label Studio's polygons have no holes: a part's polygon is its outer contour, so a hole larger than the
clean-up threshold is filled in the polygon (the brush output keeps it).
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_POLYGON_PARTS = 100  # a noisy mask can have thousands of specks; an annotator never wants them all


def clean(mask: np.ndarray, min_area: int, largest_only: bool) -> np.ndarray:
    """Fill holes and remove islands smaller than ``min_area`` pixels, and keep only the largest connected part
    if asked. An empty mask stays empty; a mask of only small specks keeps its largest one.

    The result of ``segment_anything.utils.amg.remove_small_regions`` (holes, then islands; tested equal),
    faster: the parts are labelled within the mask's bounding box only, and the parts to keep are looked up
    in a table (that function lists them in Python, quadratic in their number: a noisy mask's thousands of
    specks take it hundreds of milliseconds)."""
    box = tight_box(mask)
    if box is None or (min_area <= 0 and not largest_only):
        return mask
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = mask.shape
    mask = mask.copy()
    if min_area > 0:
        # a background part that touches the box's edge joins the background outside it, which is larger than
        # min_area when the box leaves the image's edges and enough pixels around it: then only the box (and a
        # one-pixel ring of that background) needs labelling, else the whole image
        inside = x0 > 0 and y0 > 0 and x1 < width and y1 < height and height * width - (x1 - x0) * (y1 - y0) >= min_area
        window = (slice(y0 - 1, y1 + 1), slice(x0 - 1, x1 + 1)) if inside else (slice(None), slice(None))
        labels, sizes = _parts(~mask[window])
        small = sizes < min_area
        small[0] = False  # the mask itself
        if inside:
            small[labels[0, 0]] = False  # the ring: the background outside the box
        if small.any():
            mask[window] |= small[labels]
    crop = mask[y0:y1, x0:x1]  # every island lies within the box
    labels, sizes = _parts(crop)
    keep = sizes >= min_area
    keep[0] = False  # the background
    if largest_only or not keep.any():
        keep[:] = False
        keep[1 + int(np.argmax(sizes[1:]))] = True
    if not keep[1:].all():
        mask[y0:y1, x0:x1] = keep[labels]
    return mask


def _parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label image of a bool mask's 8-connected parts (0: outside them) and each label's pixel count."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask).view(np.uint8), connectivity=8)
    return labels, stats[:, cv2.CC_STAT_AREA]


def polygons(mask: np.ndarray, tolerance: float, min_area: int, largest_only: bool) -> list[list[list[float]]]:
    """The outer contour of each connected part, largest first, simplified to ``tolerance`` pixels; parts
    smaller than ``min_area`` are dropped (the largest part always stays). Vertices are pixel centres."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # cv2's contour area of a one-pixel-wide part is 0: its contour's point count serves as a floor
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

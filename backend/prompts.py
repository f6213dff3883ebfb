"""Label Studio's interactive context -> a prompt in pixels.

``context.result`` holds the annotator's smart regions: keypoints (``is_positive``; missing means positive)
and/or rectangles, with ``x``, ``y``, ``width``, ``height`` in percent of ``original_width`` /
``original_height``. All keypoints are used together; of several rectangles, the last one. A click carries at
most ``MAX_KEYPOINTS`` keypoints and ``MAX_RECTANGLES`` rectangles (an annotator makes a handful; more is a
broken or hostile client, and each point costs decoder memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backend.labels import LabelingSchema


MAX_KEYPOINTS = 64
MAX_RECTANGLES = 32


class PromptError(ValueError):
    """The context cannot be turned into a prompt (400)."""


@dataclass
class Prompt:
    points: list[list[float]] | None
    point_labels: list[int] | None
    box: list[float] | None
    label: str | None  # the prompt's label (of its last region)
    width: int  # original_width / original_height the pixels refer to
    height: int


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{what} must be a finite number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > 1e9:
        raise PromptError(f"{what} must be a finite number of reasonable size, got {_short(value)}")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _size(item: dict) -> tuple[int, int]:
    width = _number(item.get("original_width"), "original_width")
    height = _number(item.get("original_height"), "original_height")
    if width < 1 or height < 1:
        raise PromptError(f"original_width/original_height must be positive, got {width}x{height}")
    return int(round(width)), int(round(height))


def _rectangle_box(value: dict, width: int, height: int) -> list[float]:
    x, y = _number(value.get("x"), "rectangle x"), _number(value.get("y"), "rectangle y")
    w, h = _number(value.get("width"), "rectangle width"), _number(value.get("height"), "rectangle height")
    rotation = math.radians(_number(value.get("rotation", 0) or 0, "rectangle rotation"))
    # rotation is about the top-left corner; a rotated rectangle prompts with its bounding box
    px, py, pw, ph = x * width / 100, y * height / 100, w * width / 100, h * height / 100
    cos, sin = math.cos(rotation), math.sin(rotation)
    corners = [(0.0, 0.0), (pw, 0.0), (0.0, ph), (pw, ph)]
    xs = [px + cx * cos - cy * sin for cx, cy in corners]
    ys = [py + cx * sin + cy * cos for cx, cy in corners]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise PromptError("the rectangle is empty or lies outside the image")
    return [x0, y0, x1, y1]


def parse_context(context: dict, schema: LabelingSchema) -> Prompt:
    if not isinstance(context, dict):
        raise PromptError(f"context must be an object or null, got {type(context).__name__}")
    items = context.get("result")
    if not isinstance(items, list) or not items:
        raise PromptError("context.result must be a non-empty list of keypoint or rectangle regions")
    if len(items) > MAX_KEYPOINTS + MAX_RECTANGLES:
        raise PromptError(f"context.result has {len(items)} regions; a click may carry at most {MAX_KEYPOINTS} "
                          f"keypoints and {MAX_RECTANGLES} rectangles")
    points: list[list[float]] = []
    labels: list[int] = []
    box = None
    label = None
    size = None
    rectangles = 0
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise PromptError(f"context.result[{index}] must be an object")
        kind = str(item.get("type", "")).lower()
        from_name = item.get("from_name")
        if kind not in ("keypointlabels", "keypoint", "rectanglelabels", "rectangle"):
            raise PromptError(f"context.result[{index}]: unsupported region type {item.get('type')!r} "
                              "(expected keypointlabels or rectanglelabels)")
        if from_name is not None and (not isinstance(from_name, str) or from_name not in schema.prompts):
            raise PromptError(f"context.result[{index}]: {_short(from_name)} is not a KeyPointLabels/RectangleLabels "
                              f"control of the labeling config (have {sorted(schema.prompts)})")
        value = item.get("value")
        if not isinstance(value, dict):
            raise PromptError(f"context.result[{index}].value must be an object")
        width, height = _size(item)
        if size is not None and size != (width, height):
            raise PromptError("the regions give different original_width/original_height")
        size = (width, height)
        region_labels = value.get(kind if kind.endswith("labels") else kind + "labels") or []
        if isinstance(region_labels, list) and region_labels:
            label = str(region_labels[0])
        if kind.startswith("keypoint"):
            x = _number(value.get("x"), "keypoint x") * width / 100
            y = _number(value.get("y"), "keypoint y") * height / 100
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"keypoint ({value.get('x')}%, {value.get('y')}%) lies outside the image")
            points.append([x, y])
            labels.append(0 if item.get("is_positive", True) is False else 1)
        else:
            rectangles += 1
            if rectangles > MAX_RECTANGLES:
                raise PromptError(f"more than {MAX_RECTANGLES} rectangles in one call")
            box = _rectangle_box(value, width, height)
    if len(points) > MAX_KEYPOINTS:
        raise PromptError(f"{len(points)} keypoints in one click; at most {MAX_KEYPOINTS}")
    return Prompt(points or None, labels or None, box, label, size[0], size[1])

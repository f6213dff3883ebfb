"""Label Studio's interactive context -> a prompt in pixels.

``context.result`` holds the annotator's smart regions: keypoints (``is_positive``; missing means positive)
and/or rectangles, with ``x``, ``y``, ``width``, ``height`` in percent of ``original_width`` /
``original_height``. They become objects to segment:

- no rectangle: one object, all keypoints together (each click adds one; negative ones cut);
- one rectangle: one object, the box refined by the keypoints;
- several rectangles (newer Label Studio versions send every rectangle of the control with each call): one
  object per rectangle, each with the keypoints inside it; keypoints outside every rectangle make one more.

A click carries at most ``MAX_KEYPOINTS`` keypoints and ``MAX_RECTANGLES`` rectangles (an annotator makes a
handful; more is a broken or hostile client, and each point costs decoder memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.labels import LabelingSchema


MAX_KEYPOINTS = 64
MAX_RECTANGLES = 32


class PromptError(ValueError):
    """The context cannot be turned into a prompt (400)."""


@dataclass
class ObjectPrompt:
    """One object to segment, in pixels."""

    points: list[list[float]] | None
    point_labels: list[int] | None
    box: list[float] | None
    label: str | None  # the label of its rectangle, else of its last labelled keypoint
    regions: list[str]  # each prompt region's identity (id and position), in the order they came


@dataclass
class Click:
    objects: list[ObjectPrompt]
    width: int  # original_width / original_height the pixels refer to
    height: int


@dataclass
class _Region:
    kind: str  # "keypoint" | "rectangle"
    identity: str
    label: str | None
    point: list[float] | None = None
    positive: bool = True
    box: list[float] | None = None


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


def parse_context(context: dict, schema: LabelingSchema) -> Click:
    if not isinstance(context, dict):
        raise PromptError(f"context must be an object or null, got {type(context).__name__}")
    items = context.get("result")
    if not isinstance(items, list) or not items:
        raise PromptError("context.result must be a non-empty list of keypoint or rectangle regions")
    if len(items) > MAX_KEYPOINTS + MAX_RECTANGLES:
        raise PromptError(f"context.result has {len(items)} regions; a click may carry at most {MAX_KEYPOINTS} "
                          f"keypoints and {MAX_RECTANGLES} rectangles")
    regions: list[_Region] = []
    size = None
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise PromptError(f"context.result[{index}] must be an object")
        kind = str(item.get("type", "")).lower()
        from_name = item.get("from_name")
        if kind not in ("keypointlabels", "keypoint", "rectanglelabels", "rectangle"):
            raise PromptError(f"context.result[{index}]: unsupported region type {item.get('type')!r} "
                              "(expected keypointlabels or rectanglelabels)")
        if from_name is not None and (not isinstance(from_name, str) or from_name not in schema.prompts):
            raise PromptError(f"context.result[{index}]: {_short(from_name)} is not a smart KeyPointLabels/"
                              f"RectangleLabels control of the labeling config (have {sorted(schema.prompts)})")
        value = item.get("value")
        if not isinstance(value, dict):
            raise PromptError(f"context.result[{index}].value must be an object")
        width, height = _size(item)
        if size is not None and size != (width, height):
            raise PromptError("the regions give different original_width/original_height")
        size = (width, height)
        region_labels = value.get(kind if kind.endswith("labels") else kind + "labels") or []
        label = str(region_labels[0]) if isinstance(region_labels, list) and region_labels else None
        if kind.startswith("keypoint"):
            x = _number(value.get("x"), "keypoint x") * width / 100
            y = _number(value.get("y"), "keypoint y") * height / 100
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptError(f"keypoint ({value.get('x')}%, {value.get('y')}%) lies outside the image")
            positive = item.get("is_positive", True) is not False
            identity = f"k:{item.get('id')}:{x:.1f},{y:.1f}:{int(positive)}"
            regions.append(_Region("keypoint", identity, label, point=[x, y], positive=positive))
        else:
            box = _rectangle_box(value, width, height)
            identity = "r:{}:{:.1f},{:.1f},{:.1f},{:.1f}".format(item.get("id"), *box)
            regions.append(_Region("rectangle", identity, label, box=box))
    keypoints = [r for r in regions if r.kind == "keypoint"]
    rectangles = [r for r in regions if r.kind == "rectangle"]
    if len(keypoints) > MAX_KEYPOINTS:
        raise PromptError(f"{len(keypoints)} keypoints in one click; at most {MAX_KEYPOINTS}")
    if len(rectangles) > MAX_RECTANGLES:
        raise PromptError(f"{len(rectangles)} rectangles in one call; at most {MAX_RECTANGLES}")
    return Click(_objects(rectangles, keypoints), size[0], size[1])


def _objects(rectangles: list[_Region], keypoints: list[_Region]) -> list[ObjectPrompt]:
    if len(rectangles) <= 1:
        return [_object(rectangles[0] if rectangles else None, keypoints)]
    inside: dict[int, list[_Region]] = {i: [] for i in range(len(rectangles))}
    outside = []
    for point in keypoints:
        containing = [i for i, r in enumerate(rectangles) if _contains(r.box, point.point)]
        if containing:  # the smallest rectangle that holds it
            inside[min(containing, key=lambda i: _area(rectangles[i].box))].append(point)
        else:
            outside.append(point)
    objects = [_object(rectangle, inside[i]) for i, rectangle in enumerate(rectangles)]
    if any(p.positive for p in outside):  # negative points alone select nothing
        objects.append(_object(None, outside))
    return objects


def _object(rectangle: _Region | None, keypoints: list[_Region]) -> ObjectPrompt:
    labelled = [r.label for r in ([rectangle] if rectangle else []) + keypoints[::-1] if r.label]
    return ObjectPrompt(
        points=[p.point for p in keypoints] or None,
        point_labels=[int(p.positive) for p in keypoints] or None,
        box=rectangle.box if rectangle else None,
        label=labelled[0] if labelled else None,
        regions=([rectangle.identity] if rectangle else []) + [p.identity for p in keypoints],
    )


def _contains(box: list[float], point: list[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])

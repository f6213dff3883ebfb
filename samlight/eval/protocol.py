"""Per-instance mIoU with GT box prompts or simulated clicks (overall and small / medium / large).

Each instance is prompted alone; of SAM's three multimask outputs the one with the highest predicted
IoU is kept (EfficientViT-SAM's protocol). Baselines check the harness itself: ``box`` predicts the
filled GT box, ``oracle`` the GT mask.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from segment_anything.modeling import Sam

from samlight.distill.data import TrainingSample
from samlight.eval.clicks import farthest_point, next_click
from samlight.predictor import Predictor

log = logging.getLogger(__name__)

BASELINES = ("box", "oracle")
PROMPTS = ("box", "point")
SMALL, MEDIUM = 32**2, 96**2


def size_class(area: float) -> str:
    return "small" if area < SMALL else "medium" if area < MEDIUM else "large"


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def filled_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The GT box as a mask (edges rounded to whole pixels)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros(shape, dtype=bool)
    mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return mask


@dataclass
class Instance:
    mask: np.ndarray
    box: np.ndarray  # x0, y0, x1, y1 pixels
    area: float


@dataclass
class ImageResult:
    """What was predicted for one image (kept for the example grid)."""

    image: np.ndarray
    masks: list[np.ndarray]
    ious: list[float]
    boxes: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)  # (P, 2) per instance
    labels: list[np.ndarray] = field(default_factory=list)
    name: str = ""


def instances_of(sample: TrainingSample) -> list[Instance]:
    """Ground-truth instances: COCO annotations keep their own bbox and area."""
    masks = sample.load_masks()
    anns = getattr(sample, "coco_anns", None)
    if anns is not None:
        boxes = [np.array([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
                 for a in anns]
        areas = [float(a["area"]) for a in anns]
    else:
        boxes = sample.load_boxes(masks)
        areas = [float(m.sum()) for m in masks]
    return [Instance(m, np.asarray(b, dtype=np.float64), a) for m, b, a in zip(masks, boxes, areas)]


def _best(prediction) -> tuple[np.ndarray, np.ndarray]:
    """Best of the multimask outputs by predicted IoU, for each of K prompts."""
    best = prediction.scores.argmax(axis=1)
    rows = np.arange(len(best))
    return prediction.masks[rows, best], prediction.low_res_logits[rows, best]


def _box_prompt(predictor: Predictor, embedding, instances: list[Instance], shape) -> list[np.ndarray]:
    height, width = shape
    boxes = np.stack([i.box for i in instances])
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = [np.zeros(shape, dtype=bool) for _ in instances]
    if valid.any():
        masks, _ = _best(predictor.predict_embedding(embedding, box=boxes[valid], multimask_output=True))
        for j, i in enumerate(np.flatnonzero(valid)):
            out[i] = masks[j]
    return out


def _decode_clicks(predictor: Predictor, embedding, coords, labs, previous: list | None):
    """Best masks and their low-res logits for K click sets; ``previous``: the last round's logits (chained)."""
    if previous is None:  # a first click is ambiguous: three candidates, the best by predicted IoU
        return _best(predictor.predict_embedding(embedding, coords, labs, multimask_output=True))
    return _best(predictor.predict_embedding(embedding, coords, labs, mask_input=np.stack(previous),
                                             multimask_output=False))


def _click_prompts(predictor: Predictor, embedding, instances: list[Instance], clicks: int, chained: bool = True,
                   teacher: tuple[Predictor, object] | None = None):
    """Masks after each round of clicks (rounds x instances), the teacher's masks for the same clicks (when a
    ``(teacher predictor, teacher embedding)`` is given), and the clicks themselves.

    Each click after the first goes where the model's current mask is most wrong. ``chained``: as SAM was
    trained and as the backend serves, each click also gets the model's previous low-res logits as
    ``mask_input`` (one output); otherwise every round decodes all clicks afresh (three candidates, the best).
    The teacher follows the same clicks, chained on its own logits."""
    points = [[farthest_point(i.mask)] for i in instances]
    labels = [[1] for _ in instances]
    active = [p[0] is not None for p in points]
    shape = instances[0].mask.shape
    current = [np.zeros(shape, dtype=bool) for _ in instances]
    followed = [np.zeros(shape, dtype=bool) for _ in instances]
    logits: list = [None] * len(instances)
    teacher_logits: list = [None] * len(instances)
    rounds, teacher_rounds = [], []
    for round_index in range(clicks):
        todo = [i for i, a in enumerate(active) if a]
        if todo:
            coords = np.stack([np.array(points[i]) for i in todo])
            labs = np.stack([np.array(labels[i]) for i in todo])
            previous = [logits[i] for i in todo] if chained and round_index else None
            masks, low_res = _decode_clicks(predictor, embedding, coords, labs, previous)
            for j, i in enumerate(todo):
                current[i], logits[i] = masks[j], low_res[j]
            if teacher is not None:
                previous = [teacher_logits[i] for i in todo] if chained and round_index else None
                masks, low_res = _decode_clicks(*teacher, coords, labs, previous)
                for j, i in enumerate(todo):
                    followed[i], teacher_logits[i] = masks[j], low_res[j]
        rounds.append(list(current))
        teacher_rounds.append(list(followed))
        if round_index + 1 == clicks:
            break
        for i in todo:
            click = next_click(current[i], instances[i].mask)
            if click is None:
                active[i] = False  # perfect: nothing left to correct
                continue
            points[i].append(click[0])
            labels[i].append(click[1])
    clicked = [np.array(p) if p[0] is not None else np.zeros((0, 2)) for p in points]
    return rounds, teacher_rounds if teacher is not None else None, clicked, [np.array(l) for l in labels]


def evaluate_samples(model: Sam | str, samples: list[TrainingSample], prompt: str = "box", clicks: int = 1,
                     device: str | None = None, keep_examples: int = 0, progress: bool = False,
                     predictor: Predictor | None = None, chained: bool = True,
                     teacher_predictor: Predictor | None = None) -> dict:
    """mIoU of ``model`` (a ``Sam`` or a baseline name) over every GT instance of ``samples``.

    Returns ``{"miou", "instances", "images", "by_size": {small|medium|large: {"miou", "instances"}},
    "per_click_miou" and "chained" (point prompts), "per_click_fidelity" (point prompts with a
    ``teacher_predictor``: mask IoU to the teacher given the same clicks), "seconds", "examples" (ImageResults
    of the first images)}``.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    if clicks < 1:
        raise ValueError(f"clicks must be >= 1, got {clicks}")
    baseline = model if isinstance(model, str) else None
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; known: {', '.join(BASELINES)}")
    if baseline is None and predictor is None:
        predictor = Predictor(model, device=device)
    started = time.perf_counter()
    ious: list[float] = []
    classes: list[str] = []
    per_click: list[list[float]] = []
    per_click_fidelity: list[list[float]] = []
    examples: list[ImageResult] = []
    images = 0
    from tqdm import tqdm

    for sample in tqdm(samples, desc="eval", unit="image", disable=not progress):
        instances = [i for i in instances_of(sample)]
        if not instances:
            continue
        images += 1
        shape = instances[0].mask.shape
        need_image = baseline is None or len(examples) < keep_examples
        image = sample.load_image() if need_image else None
        points: list = []
        labels: list = []
        if baseline == "box":
            rounds = [[filled_box(i.box, shape) for i in instances]]
        elif baseline == "oracle":
            rounds = [[i.mask.copy() for i in instances]]
        else:
            if image.shape[:2] != shape:
                raise ValueError(f"{sample.image}: masks are {shape}, image is {image.shape[:2]}")
            embedding = predictor.embed(image, sample.key)
            if prompt == "box":
                rounds = [_box_prompt(predictor, embedding, instances, shape)]
            else:
                teacher = None
                if teacher_predictor is not None:
                    teacher = (teacher_predictor, teacher_predictor.embed(image, sample.key))
                rounds, teacher_rounds, points, labels = _click_prompts(predictor, embedding, instances, clicks,
                                                                        chained, teacher)
                for r, (masks, followed) in enumerate(zip(rounds, teacher_rounds or [])):
                    while len(per_click_fidelity) <= r:
                        per_click_fidelity.append([])
                    per_click_fidelity[r].extend(mask_iou(a, b) for a, b in zip(masks, followed))
                if teacher_predictor is not None:
                    teacher_predictor.cache.clear()
            predictor.cache.clear()  # evaluation never revisits an image
        final = rounds[-1]
        image_ious = [mask_iou(m, i.mask) for m, i in zip(final, instances)]
        ious.extend(image_ious)
        classes.extend(size_class(i.area) for i in instances)
        if prompt == "point":
            for r, masks in enumerate(rounds if baseline is None else rounds * clicks):
                while len(per_click) <= r:
                    per_click.append([])
                per_click[r].extend(mask_iou(m, i.mask) for m, i in zip(masks, instances))
        if len(examples) < keep_examples:
            examples.append(ImageResult(image, final, image_ious,
                                        [i.box for i in instances] if prompt == "box" else [],
                                        points, labels, name=str(getattr(sample, "coco_image_id", sample.key or ""))))
    result = summarise(ious, classes)
    result.update({"images": images, "prompt": prompt, "seconds": time.perf_counter() - started, "examples": examples})
    if prompt == "point":
        result["clicks"] = clicks
        result["chained"] = chained
        result["per_click_miou"] = [float(np.mean(v)) for v in per_click]
        if per_click_fidelity:
            result["per_click_fidelity"] = [float(np.mean(v)) for v in per_click_fidelity]
    return result


def summarise(ious: list[float], classes: list[str]) -> dict:
    by_size = {}
    for name in ("small", "medium", "large"):
        chosen = [v for v, c in zip(ious, classes) if c == name]
        by_size[name] = {"miou": float(np.mean(chosen)) if chosen else None, "instances": len(chosen)}
    return {"miou": float(np.mean(ious)) if ious else float("nan"), "instances": len(ious), "by_size": by_size}

"""Masks for everything in an image, before anyone clicks: SAM's automatic mask generation on a cached embedding.

As ``segment_anything.SamAutomaticMaskGenerator`` does it (its ``utils.amg`` helpers): a grid of one-point
prompts, three candidates each, kept when the predicted IoU and the stability score pass their thresholds,
then box non-maximum suppression, optionally over crops of the image too (small objects). Changes for speed:
the grid runs in a few large decoder batches on the embedding the image already has (the generator re-embeds
the image), and the two scores and the NMS work on the low-resolution logits, so only the masks that are kept
are upsampled to the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

    from samlight.predictor import ImageEmbedding, Predictor


@dataclass(frozen=True)
class AutoSpec:
    """The quality filters of automatic masks (JSON in a job)."""

    points_per_side: int = 32  # the grid: points_per_side² one-point prompts
    pred_iou: float = 0.88  # the decoder's predicted IoU must be at least this
    stability: float = 0.95  # IoU between the mask at logit thresholds -1 and +1 must be at least this
    box_nms: float = 0.7  # of two masks whose boxes overlap more than this (IoU), the lower-scoring one goes
    crop_layers: int = 0  # small objects: layer i adds (2^i)² overlapping crops, each embedded and gridded
    crop_overlap: float = 512 / 1500  # as SAM's generator
    batch: int = 256  # prompts per decoder call
    max_masks: int = 200  # the best this many, at most


def automatic_masks(predictor: "Predictor", embedding: "ImageEmbedding", spec: AutoSpec,
                    image: Callable[[], np.ndarray] | None = None) -> list[tuple["torch.Tensor", float]]:
    """``(mask, score)`` pairs, best first: each mask (H, W) bool on the predictor's device, its predicted IoU.

    With crop layers, ``image()`` gives the picture to crop (only called then); masks that touch a crop's inner
    edge are dropped, and across crops the mask of the smaller crop wins, as in SAM's generator.
    """
    import torch
    from segment_anything.utils.amg import (build_all_layer_point_grids, generate_crop_boxes,
                                            is_box_near_crop_edge, uncrop_masks)
    from torchvision.ops import batched_nms

    height, width = embedding.original_size
    crops, layers = ([[0, 0, width, height]], [0]) if spec.crop_layers == 0 else \
        generate_crop_boxes((height, width), spec.crop_layers, spec.crop_overlap)
    grids = build_all_layer_point_grids(spec.points_per_side, spec.crop_layers, 1)
    picture = image() if spec.crop_layers else None
    found: list[tuple] = []  # (masks at full size, scores, boxes, crop area)
    for crop, layer in zip(crops, layers):
        x0, y0, x1, y1 = crop
        here = embedding if layer == 0 else predictor.embed(np.ascontiguousarray(picture[y0:y1, x0:x1]))
        masks, scores, boxes = _grid_masks(predictor, here, grids[layer], spec)
        if layer > 0 and len(scores):
            inside = ~is_box_near_crop_edge(boxes, crop, [0, 0, width, height])
            masks, scores = uncrop_masks(masks[inside], crop, height, width), scores[inside]
            boxes = _boxes(masks)
        found.append((masks, scores, boxes, (x1 - x0) * (y1 - y0)))
    masks = torch.cat([m for m, *_ in found])
    if len(masks) == 0:
        return []
    scores, boxes = torch.cat([s for _, s, *_ in found]), torch.cat([b for _, _, b, _ in found])
    if len(found) > 1:  # across crops the smaller crop's mask wins (it saw the object at a higher resolution)
        rank = torch.cat([torch.full_like(s, 1.0 / area) for _, s, _, area in found])
        kept = batched_nms(boxes, rank, torch.zeros_like(rank), iou_threshold=spec.box_nms)
        masks, scores = masks[kept], scores[kept]
    order = scores.argsort(descending=True)[: spec.max_masks]
    return [(masks[i], float(scores[i])) for i in order.tolist()]


def _boxes(masks: "torch.Tensor") -> "torch.Tensor":
    from segment_anything.utils.amg import batched_mask_to_box

    return batched_mask_to_box(masks).float()


def _grid_masks(predictor: "Predictor", embedding: "ImageEmbedding", grid: np.ndarray, spec: AutoSpec):
    """The masks (K, H, W) bool of one image's (or crop's) point grid that pass the thresholds and box NMS,
    with their scores and boxes."""
    import torch
    from torchvision.ops import batched_nms

    height, width = embedding.original_size
    points_xy = grid * np.array([width, height])
    threshold = predictor.model.mask_threshold
    logits, scores = [], []
    for start in range(0, len(points_xy), spec.batch):
        low_res, iou, stable = predictor.decode_grid(embedding, points_xy[start:start + spec.batch, None, :])
        low_res, iou, stable = low_res.flatten(0, 1), iou.flatten(), stable.flatten()
        keep = (iou >= spec.pred_iou) & (stable >= spec.stability)
        logits.append(low_res[keep])
        scores.append(iou[keep])
    logits, scores = torch.cat(logits), torch.cat(scores)
    # box NMS on the low-resolution masks (boxes within a few pixels: NMS at IoU 0.7 does not notice), so that
    # only the survivors are upsampled to the image's size
    low_boxes = _boxes(logits > threshold)
    present = (low_boxes[:, 2] > low_boxes[:, 0]) | (low_boxes[:, 3] > low_boxes[:, 1])
    logits, scores, low_boxes = logits[present], scores[present], low_boxes[present]
    if len(scores) == 0:
        empty = torch.zeros((0, height, width), dtype=torch.bool, device=logits.device)
        return empty, scores, torch.zeros((0, 4), device=logits.device)
    input_h, input_w = embedding.input_size
    stride = predictor.model.image_encoder.img_size / logits.shape[-1]  # input pixels per low-res pixel
    low_boxes = low_boxes * low_boxes.new_tensor([width / input_w, height / input_h] * 2) * stride
    kept = batched_nms(low_boxes, scores, torch.zeros_like(scores), iou_threshold=spec.box_nms)[: spec.max_masks]
    masks = predictor.model.postprocess_masks(logits[kept, None].float(), embedding.input_size,
                                              embedding.original_size)
    masks, scores = masks[:, 0] > threshold, scores[kept]
    present = masks.flatten(1).any(1)
    masks, scores = masks[present], scores[present]
    return masks, scores, _boxes(masks)

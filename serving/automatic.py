"""Masks for everything in an image, before anyone clicks: SAM's automatic mask generation on a cached embedding.

As ``segment_anything.SamAutomaticMaskGenerator`` does it (its ``utils.amg`` helpers): a grid of one-point
prompts, three candidates each, kept when the predicted IoU and the stability score pass their thresholds,
then box non-maximum suppression. Two changes for speed: the grid runs in a few large decoder batches on the
embedding the image already has (the generator re-embeds the image), and the two scores are computed on the
low-resolution logits, so only the masks that pass are upsampled to the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    batch: int = 256  # prompts per decoder call
    max_masks: int = 200  # the best this many, at most


def automatic_masks(predictor: "Predictor", embedding: "ImageEmbedding", spec: AutoSpec
                    ) -> list[tuple["torch.Tensor", float]]:
    """``(mask, score)`` pairs, best first: each mask (H, W) bool on the predictor's device, its predicted IoU."""
    import torch
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
    from torchvision.ops import batched_nms

    height, width = embedding.original_size
    grid = build_point_grid(spec.points_per_side) * np.array([width, height])
    threshold = predictor.model.mask_threshold
    logits, scores = [], []
    for start in range(0, len(grid), spec.batch):
        points = grid[start:start + spec.batch, None, :]
        low_res, iou = predictor.decode(embedding, points, np.ones(points.shape[:2], dtype=np.int64),
                                        multimask_output=True)
        low_res, iou = low_res.flatten(0, 1), iou.flatten()
        stable = calculate_stability_score(low_res, threshold, 1.0)
        keep = (iou >= spec.pred_iou) & (stable >= spec.stability)
        logits.append(low_res[keep])
        scores.append(iou[keep])
    logits, scores = torch.cat(logits), torch.cat(scores)
    if len(scores) == 0:
        return []
    order = scores.argsort(descending=True)[: spec.max_masks * 4]  # NMS drops many; upsample only the leaders
    masks = predictor.model.postprocess_masks(logits[order, None], embedding.input_size, embedding.original_size)
    masks, scores = masks[:, 0] > threshold, scores[order]
    present = masks.flatten(1).any(1)
    masks, scores = masks[present], scores[present]
    boxes = batched_mask_to_box(masks).float()
    kept = batched_nms(boxes, scores, torch.zeros_like(scores), iou_threshold=spec.box_nms)[: spec.max_masks]
    return [(masks[i], float(scores[i])) for i in kept.tolist()]

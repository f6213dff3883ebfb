"""Losses of both stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_mse(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """||prediction - target||^2 / ||target||^2 over the batch: scale free, so layers of very
    different magnitudes (a teacher's residual stream grows with depth) weigh alike."""
    prediction, target = prediction.float(), target.float()
    return (prediction - target).pow(2).sum() / (target.pow(2).sum() + eps)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Per-mask focal loss (mean over pixels); logits and targets (..., H, W)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss; logits and targets (..., H, W)."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + eps) / (denominator + eps)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded masks (..., H, W) vs binary targets, per mask."""
    pred = (logits > 0).flatten(-2)
    targets = targets.flatten(-2) > 0.5
    inter = (pred & targets).sum(-1).float()
    union = (pred | targets).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

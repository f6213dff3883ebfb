"""Layer mapping and the dynamic layer weights of Dynamic Layer-wise Distillation.

Mapping: student block ``l`` (1-based, ``l = 1..Ls``) learns from teacher block ``m(l) = ceil(l * Lt / Ls)``,
so the last student block always matches the last teacher block.

Dynamic weights: with training progress ``p = s / max(1, S - 1)`` in ``[0, 1]`` at step ``s`` of ``S``
and layer position ``u_l = (l - 1) / (Ls - 1)`` (``u_1 = 0`` shallowest, ``u_Ls = 1`` deepest; ``u = 1``
when ``Ls = 1``)::

    w_l(p) = exp(-(u_l - p)^2 / (2 sigma^2)) / sum_k exp(-(u_k - p)^2 / (2 sigma^2))

a softmax over layers of a Gaussian bump whose centre travels from the shallowest layer (p = 0) to
the deepest (p = 1); ``sigma`` (default 0.25) sets how many neighbouring layers share the weight.
The encoder-stage loss is ``sum_l w_l(p) * L_feat(P_l(s_l), t_m(l)) + lambda_neck * L_feat(s_neck, t_neck)``.
"""

from __future__ import annotations

import math


def layer_mapping(student_depth: int, teacher_depth: int) -> list[int]:
    """0-based teacher block index for each student block: ``ceil(l * Lt / Ls) - 1`` for ``l = 1..Ls``."""
    if student_depth < 1 or teacher_depth < 1:
        raise ValueError(f"depths must be positive, got student {student_depth}, teacher {teacher_depth}")
    return [math.ceil(l * teacher_depth / student_depth) - 1 for l in range(1, student_depth + 1)]


def progress(step: int, total_steps: int) -> float:
    return min(1.0, max(0.0, step / max(1, total_steps - 1)))


def dynamic_layer_weights(step: int, total_steps: int, num_layers: int, sigma: float = 0.25) -> list[float]:
    """``w_l(p)`` of the module docstring; sums to 1, moves from shallow to deep as training proceeds."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    p = progress(step, total_steps)
    positions = [(l / (num_layers - 1)) if num_layers > 1 else 1.0 for l in range(num_layers)]
    logits = [-((u - p) ** 2) / (2 * sigma**2) for u in positions]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]

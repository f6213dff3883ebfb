"""How closely a student follows its teacher: the same prompts on the same images.

Mask IoU between the student's and the teacher's masks (each keeping its best multimask output by
predicted IoU), and the cosine / relative MSE between their image embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm import tqdm

from samlight.distill.data import TrainingSample
from samlight.eval.clicks import farthest_point
from samlight.eval.protocol import _best, instances_of, mask_iou
from samlight.predictor import Predictor

GRID_POINTS = 4  # images without ground truth are prompted with a 4 x 4 grid of clicks


PROMPTS = ("box", "point")


def _prompts(sample: TrainingSample, shape: tuple[int, int], prompt: str = "box") -> dict:
    """Each ground-truth instance's box, or its first click (the point farthest from its boundary); images
    without ground truth: a grid of clicks."""
    instances = instances_of(sample)
    if prompt == "box":
        boxes = [i.box for i in instances if i.box[2] > i.box[0] and i.box[3] > i.box[1]]
        if boxes:
            return {"box": np.stack(boxes)}
    else:
        clicks = [c for c in (farthest_point(i.mask) for i in instances) if c is not None]
        if clicks:
            points = np.stack(clicks)[:, None, :]
            return {"point_coords": points, "point_labels": np.ones(points.shape[:2], dtype=np.int64)}
    height, width = shape
    xs = (np.arange(GRID_POINTS) + 0.5) * width / GRID_POINTS
    ys = (np.arange(GRID_POINTS) + 0.5) * height / GRID_POINTS
    points = np.array([[[x, y]] for y in ys for x in xs])
    return {"point_coords": points, "point_labels": np.ones(points.shape[:2], dtype=np.int64)}


def embedding_similarity(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative MSE) of two (1, C, g, g) embeddings (the student's resized to the teacher's grid)."""
    student, teacher = student.float(), teacher.float()
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    cosine = F.cosine_similarity(student.flatten(), teacher.flatten(), dim=0).item()
    rel_mse = ((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-12)).item()
    return cosine, rel_mse


def fidelity(student: Sam, teacher: Sam, samples: list[TrainingSample], device: str | None = None,
             progress: bool = False, student_predictor: Predictor | None = None,
             teacher_predictor: Predictor | None = None, prompt: str = "box") -> dict:
    """``{"mask_iou", "prompts", "embedding_cosine", "embedding_rel_mse", "images"}`` (means); ``prompt``: each
    instance's box, or its first click (one point)."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    s_pred = student_predictor or Predictor(student, device=device)
    t_pred = teacher_predictor or Predictor(teacher, device=device)
    ious, cosines, rel_mses = [], [], []
    for sample in tqdm(samples, desc="fidelity", unit="image", disable=not progress):
        image = sample.load_image()
        s_emb, t_emb = s_pred.embed(image), t_pred.embed(image)
        cosine, rel_mse = embedding_similarity(s_emb.features, t_emb.features)
        cosines.append(cosine)
        rel_mses.append(rel_mse)
        prompts = _prompts(sample, image.shape[:2], prompt)
        s_masks, _ = _best(s_pred.predict_embedding(s_emb, multimask_output=True, **prompts))
        t_masks, _ = _best(t_pred.predict_embedding(t_emb, multimask_output=True, **prompts))
        ious.extend(mask_iou(a, b) for a, b in zip(s_masks, t_masks))
        s_pred.cache.clear()
        t_pred.cache.clear()
    return {
        "mask_iou": float(np.mean(ious)) if ious else float("nan"),
        "prompts": len(ious),
        "embedding_cosine": float(np.mean(cosines)) if cosines else float("nan"),
        "embedding_rel_mse": float(np.mean(rel_mses)) if rel_mses else float("nan"),
        "images": len(cosines),
    }

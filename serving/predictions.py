"""What a project's labeling config and options make of a job's answers: Label Studio predictions.

One place for it, because three paths produce predictions: a click (``/predict`` with a context), a batch
answered inline, and pre-annotation finished in the background (a thread of the backend, or an RQ worker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

from serving import labelstudio
from serving.automatic import AutoSpec
from serving.jobs import OutputSpec
from serving.labels import LabelingSchema, Target
from serving.options import ProjectOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectPredictions:
    schema: LabelingSchema
    options: ProjectOptions

    @cached_property
    def targets(self) -> tuple[Target, ...]:
        """The targets the project's outputs option picks (``ConfigError`` when it names none)."""
        return self.schema.select(self.options.outputs)

    @property
    def output(self) -> OutputSpec:
        """What a job must compute for the targets."""
        kinds = {t.kind for t in self.targets}
        options = self.options
        return OutputSpec(brush="brush" in kinds, polygon="polygon" in kinds, box="box" in kinds,
                          min_area=options.min_area, largest_only=options.largest_only,
                          polygon_tolerance=options.polygon_tolerance)

    @property
    def auto(self) -> AutoSpec:
        options = self.options
        return AutoSpec(points_per_side=options.auto_points_per_side, pred_iou=options.auto_pred_iou,
                        stability=options.auto_stability, box_nms=options.auto_box_nms,
                        crop_layers=options.auto_crop_layers)

    def regions(self, image: str, result: dict, labels: list[str | None]) -> tuple[list[dict], list[float]]:
        """A job's answers (each with its prompt's label) as regions of every target, and their scores; answers
        skipped as answered before, or scoring below min_score, are left out."""
        regions, scores = [], []
        for answer, label in zip(result["objects"], labels):
            if "skipped" in answer:
                continue
            score = min(1.0, max(0.0, float(answer["score"])))  # the decoder's IoU estimate can leave [0, 1]
            if score < self.options.min_score:
                log.info("mask for %s not suggested: score %.3f < min_score %.3f", image, score,
                         self.options.min_score)
                continue
            named = self.schema.labels_for(self.targets, label)
            for target in (t for t in self.targets if t.name in named):
                regions += labelstudio.regions(target.kind, target.name, self.schema.image_name, result["width"],
                                               result["height"], answer, named[target.name], score)
            scores.append(score)
        return regions, scores

    def interactive(self, image: str, result: dict, labels: list[str | None], version: str) -> dict:
        """A click's prediction: its best mask's score."""
        regions, scores = self.regions(image, result, labels)
        return {"result": regions, "score": max(scores, default=0.0),
                "model_version": result.get("model_version") or version}

    def automatic(self, image: str, result: dict, version: str) -> dict:
        """Automatic masks as one prediction, labelled with ``auto_label``, scored by their mean."""
        regions, scores = self.regions(image, result, [self.options.auto_label] * len(result["objects"]))
        log.info("automatic masks for %s: %d kept, %s", image, len(scores),
                 " ".join(f"{k}={v:.1f}ms" for k, v in (result.get("timings_ms") or {}).items()))
        return {"result": regions, "score": sum(scores) / len(scores) if scores else 0.0,
                "model_version": result.get("model_version") or version}

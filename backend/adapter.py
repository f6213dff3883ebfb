"""``LabelStudioAdapter``: Label Studio's ML backend protocol (label-studio-ml 2.x style), ``predict(tasks,
context)`` and ``fit(event, data)``, over the process's segmenter, image fetcher and correction sink.

It holds no per-process state: every request carries the labeling config, and the model is built per request
around the process's shared services (segmenter, image fetcher, correction sink).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from backend.labels import ConfigError, LabelingSchema, Target, parse_config
from backend.prompts import Click, parse_context
from serving import labelstudio
from serving.corrections import CorrectionSink, webhook_events
from serving.errors import StatusError
from serving.images import FetchError, ImageFetcher
from serving.automatic import AutoSpec
from serving.jobs import ObjectJob, OutputSpec, SegmentJob
from serving.options import ProjectOptions
from serving.refinement import click_key
from serving.segmenter import Segmenter

log = logging.getLogger(__name__)

# tasks of one batch call answered with automatic masks; Label Studio asks again for the others when they are
# opened (it waits a limited time for /predict: a larger batch needs the background path, not built yet)
MAX_AUTOMATIC_TASKS = 4


class PredictError(StatusError):
    """A /predict request this backend cannot answer (bad tasks, config, or a failed job)."""


@dataclass
class Services:
    """What every request shares in one process."""

    segmenter: Segmenter
    fetcher: ImageFetcher
    sink: CorrectionSink


class LabelStudioAdapter:
    def __init__(self, services: Services, label_config: str | None = None,
                 options: ProjectOptions | None = None) -> None:
        self.services = services
        self.label_config = label_config
        self.options = options or ProjectOptions()

    @property
    def model_version(self) -> str:
        return self.services.segmenter.model_version

    @property
    def schema(self) -> LabelingSchema:
        if not self.label_config:
            raise PredictError("label_config is missing")
        return parse_config(self.label_config)

    # --- predictions ----------------------------------------------------------------------------

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict | list]:
        """Regions for an interactive context (each target of the labeling config gets each object's mask in
        its form); for a batch call, no prediction for any task.

        A batch call is Label Studio opening a task (or "Retrieve Predictions"): it prewarms the images'
        embeddings and answers an empty *list* of predictions per task. Label Studio stores nothing for an
        empty list, so tasks are not cluttered with empty prediction tabs, and since it asks again whenever a
        task has no prediction, every later open prewarms too (after a backend restart as well).
        """
        schema = self.schema
        if not isinstance(tasks, list) or not tasks:
            raise PredictError("tasks must be a non-empty list")
        urls = [self._image_url(task, index, schema) for index, task in enumerate(tasks)]
        if context and (context.get("result") if isinstance(context, dict) else True):
            if len(tasks) != 1:
                raise PredictError(f"an interactive context applies to one task, got {len(tasks)}")
            return [self._interactive(urls[0], parse_context(context, schema), schema)]
        if self.options.auto_annotate:
            targets, output = self._targets(schema)
            inline = urls[:MAX_AUTOMATIC_TASKS]  # the rest are asked for again when they are opened
            return [self._automatic(url, schema, targets, output) for url in inline] + [[] for _ in urls[len(inline):]]
        if self.options.prewarm:
            self._prewarm(urls)
        return [[] for _ in tasks]

    @staticmethod
    def _image_url(task, index: int, schema: LabelingSchema) -> str:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise PredictError(f"tasks[{index}] must be an object with a 'data' object")
        url = task["data"].get(schema.image_value)
        if not isinstance(url, str) or not url:
            raise PredictError(f"task {task.get('id', index)} has no image URL in data.{schema.image_value}")
        return url

    def _job(self, url: str, **fields) -> SegmentJob:
        try:
            key = self.services.fetcher.image_key(url)
        except FetchError as error:
            raise PredictError(str(error), error.status) from None
        return SegmentJob(image_url=url, image_key=key, **fields)

    def _prewarm(self, urls: list[str]) -> None:
        jobs = []
        for url in dict.fromkeys(urls):
            try:
                jobs.append(self._job(url, prewarm_only=True))
            except PredictError as error:  # a batch call still answers for every task
                log.warning("not prewarming %s: %s", url, error)
        if jobs:
            self.services.segmenter.prewarm(jobs)

    def _targets(self, schema: LabelingSchema) -> tuple[tuple[Target, ...], OutputSpec]:
        """The targets the project's outputs option picks, and what a job must compute for them."""
        try:
            targets = schema.select(self.options.outputs)
        except ConfigError as error:
            raise PredictError(str(error)) from None
        kinds = {t.kind for t in targets}
        return targets, OutputSpec(brush="brush" in kinds, polygon="polygon" in kinds, box="box" in kinds,
                                   min_area=self.options.min_area, largest_only=self.options.largest_only,
                                   polygon_tolerance=self.options.polygon_tolerance)

    def _suggested(self, url: str, schema: LabelingSchema, targets: tuple[Target, ...], result: dict,
                   labels: list[str | None]) -> tuple[list[dict], list[float]]:
        """A job's answers (each with its prompt's label) as regions of every target, and their scores; answers
        skipped as answered before, or scoring below min_score, are left out."""
        regions, scores = [], []
        for answer, label in zip(result["objects"], labels):
            if "skipped" in answer:
                continue
            score = min(1.0, max(0.0, float(answer["score"])))  # the decoder's IoU estimate can leave [0, 1]
            if score < self.options.min_score:
                log.info("mask for %s not suggested: score %.3f < min_score %.3f", url, score, self.options.min_score)
                continue
            named = schema.labels_for(targets, label)
            for target in (t for t in targets if t.name in named):
                regions += labelstudio.regions(target.kind, target.name, schema.image_name, result["width"],
                                               result["height"], answer, named[target.name], score)
            scores.append(score)
        return regions, scores

    def _automatic(self, url: str, schema: LabelingSchema, targets: tuple[Target, ...], output: OutputSpec
                   ) -> dict | list:
        """A batch prediction: automatic masks for the whole image, in the project's outputs; none (an empty
        list) when the image fails, so that one task does not fail the batch."""
        auto = AutoSpec(points_per_side=self.options.auto_points_per_side, pred_iou=self.options.auto_pred_iou,
                        stability=self.options.auto_stability)
        try:
            result = self.services.segmenter.segment([self._job(url, output=output, auto=auto)])[0]
        except PredictError as error:
            result = {"error": str(error)}
        if "error" in result:
            log.warning("no automatic masks for %s: %s", url, result["error"])
            return []
        regions, scores = self._suggested(url, schema, targets, result,
                                          [self.options.auto_label] * len(result["objects"]))
        log.info("automatic masks for %s: %d kept, %s", url, len(scores),
                 " ".join(f"{k}={v:.1f}ms" for k, v in (result.get("timings_ms") or {}).items()))
        return {"result": regions, "score": sum(scores) / len(scores) if scores else 0.0,
                "model_version": result.get("model_version") or self.model_version}

    def _interactive(self, url: str, click: Click, schema: LabelingSchema) -> dict:
        targets, output = self._targets(schema)
        job = self._job(url, reference_size=[click.width, click.height], output=output)
        # several objects: those answered before (newer Label Studio versions resend every rectangle) are skipped
        several = len(click.objects) > 1
        job.objects = [ObjectJob(points=o.points, point_labels=o.point_labels, box=o.box,
                                 key=click_key(job.image_key, o.regions),
                                 refine=click_key(job.image_key, o.regions[:-1])
                                 if self.options.refine and len(o.regions) > 1 else None,
                                 skip_answered=several)
                       for o in click.objects]
        result = self.services.segmenter.segment([job])[0]
        if "error" in result:
            raise PredictError(result["error"], int(result.get("status", 500)))
        log.info("masks for %s: cached=%s %s", url, result.get("cached"),
                 " ".join(f"{k}={v:.1f}ms" for k, v in (result.get("timings_ms") or {}).items()))
        version = result.get("model_version") or self.model_version
        regions, scores = self._suggested(url, schema, targets, result, [o.label for o in click.objects])
        return {"result": regions, "score": max(scores, default=0.0), "model_version": version}

    # --- training events ------------------------------------------------------------------------

    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Record correction and training events durably (``EventError`` if malformed); ignore the others."""
        events = webhook_events({**data, "action": event})
        if not events:
            return {"status": "ignored", "action": event}
        for item in events:
            self.services.sink.record(_with_image_url(item))
        return {"status": "recorded", "action": event, "events": len(events)}


def _with_image_url(event: dict) -> dict:
    """An annotation event with the task's image URL found by the labeling config's rule, the one ``/predict``
    uses, so that training reads the image the annotator saw (Label Studio sends the project, config
    included, with each webhook). Events without a usable config are recorded as they came."""
    project, task = event.get("project"), event.get("task")
    config = project.get("label_config") if isinstance(project, dict) else None
    if "annotation" not in event or not isinstance(config, str) or not isinstance(task, dict):
        return event
    try:
        key = parse_config(config).image_value
    except ConfigError:
        return event
    url = (task.get("data") or {}).get(key)
    return {**event, "samlight": {"image_url": url}} if isinstance(url, str) else event

"""``LabelStudioAdapter``: Label Studio's ML backend protocol (label-studio-ml 2.x style), ``predict(tasks,
context)`` and ``fit(event, data)``, over the process's segmenter, image fetcher and correction sink.

It holds no per-process state: every request carries the labeling config, and the model is built per request
around the process's shared services (segmenter, image fetcher, correction sink).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from backend.prompts import Click, parse_context
from serving.corrections import CorrectionSink, webhook_events
from serving.errors import StatusError
from serving.images import FetchError, ImageFetcher, task_image_url
from serving.jobs import ObjectJob, SegmentJob
from serving.labels import ConfigError, LabelingSchema, parse_config
from serving.options import ProjectOptions
from serving.preannotation import Preannotation
from serving.predictions import ProjectPredictions
from serving.refinement import click_key
from serving.segmenter import Segmenter

log = logging.getLogger(__name__)

class PredictError(StatusError):
    """A /predict request this backend cannot answer (bad tasks, config, or a failed job)."""


@dataclass
class Services:
    """What every request shares in one process."""

    segmenter: Segmenter
    fetcher: ImageFetcher
    sink: CorrectionSink
    preannotations: object | None = None  # SpoolQueue | RQQueue; None without Label Studio API access
    inline_s: float = 20.0  # a batch of automatic masks is answered inline this long, the rest in the background


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

        A batch call is Label Studio opening a task (or "Retrieve Predictions"). With ``auto_annotate`` it answers
        automatic masks (``_automatic_batch``); otherwise it prewarms the images' embeddings and answers an
        empty *list* of predictions per task. Label Studio stores nothing for an
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
            return self._automatic_batch(tasks, urls, self._predictions(schema))
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
        try:
            return task_image_url(url, task.get("id"))
        except FetchError as error:
            raise PredictError(str(error), error.status) from None

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

    def _predictions(self, schema: LabelingSchema) -> ProjectPredictions:
        predictions = ProjectPredictions(schema, self.options)
        try:
            predictions.targets
        except ConfigError as error:
            raise PredictError(str(error)) from None
        return predictions

    def _automatic_batch(self, tasks: list[dict], urls: list[str], predictions: ProjectPredictions) -> list:
        """Automatic masks for as many tasks as fit in the inline budget; the others (and those the model could
        not reach in time) go to the background queue, which posts their predictions to Label Studio."""
        deadline = time.monotonic() + self.services.inline_s
        answers: list = []
        later: list[int] = []
        for index, url in enumerate(urls):
            if time.monotonic() >= deadline:
                later += range(index, len(urls))
                break
            answer, retry = self._automatic(url, predictions)
            answers.append(answer)
            if retry:
                later.append(index)
        if later:
            self._in_background([(tasks[i], urls[i]) for i in later], predictions)
        return answers + [[] for _ in range(len(urls) - len(answers))]

    def _automatic(self, url: str, predictions: ProjectPredictions) -> tuple[dict | list, bool]:
        """A task's automatic masks, or ``([], retry)`` when it fails: a busy or unreachable model, or an image
        server that timed out (503, 504), is retried in the background; a bad or missing image is not."""
        try:
            result = self.services.segmenter.segment([self._job(url, output=predictions.output,
                                                               auto=predictions.auto)])[0]
        except PredictError as error:
            result = {"error": str(error), "status": error.status}
        if "error" in result:
            log.warning("no automatic masks for %s: %s", url, result["error"])
            return [], int(result.get("status", 500)) in (503, 504)
        return predictions.automatic(url, result, self.model_version), False

    def _in_background(self, items: list[tuple[dict, str]], predictions: ProjectPredictions) -> None:
        queue = self.services.preannotations
        if queue is None:
            log.warning("%d task(s) of the batch get no automatic masks: background pre-annotation posts them "
                        "through Label Studio's API, which needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
                        len(items))
            return
        work = []
        for task, url in items:
            task_id = task.get("id")
            try:
                key = self.services.fetcher.image_key(url)
            except FetchError as error:
                log.warning("no automatic masks for task %s: %s", task_id, error)
                continue
            if isinstance(task_id, bool) or not isinstance(task_id, int):
                log.warning("no automatic masks for a task without an id (%s): its prediction could not be posted",
                            url)
                continue
            work.append(Preannotation(task_id=task_id, image_url=url, image_key=key,
                                      label_config=self.label_config, options=self.options.to_dict(),
                                      model_version=self.model_version))
        if work:
            queue.submit(work)

    def _interactive(self, url: str, click: Click, schema: LabelingSchema) -> dict:
        predictions = self._predictions(schema)
        job = self._job(url, reference_size=[click.width, click.height], output=predictions.output)
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
        return predictions.interactive(url, result, [o.label for o in click.objects], self.model_version)

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
    if not isinstance(url, str):
        return event
    try:
        url = task_image_url(url, task.get("id"))
    except FetchError:  # recorded as it came: training reports the image it cannot fetch
        pass
    return {**event, "samlight": {"image_url": url}}

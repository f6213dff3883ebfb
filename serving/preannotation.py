"""Pre-annotation that outlasts a request: automatic masks for the tasks a batch call could not answer in time.

Label Studio sends "Retrieve Predictions" for every selected task in ONE ``/predict`` call and waits
``ML_TIMEOUT_PREDICT`` (100 s) for it; what the backend does not answer in that call it never asks for again
(an empty answer stores nothing). So the backend answers what fits in its inline budget and hands the rest to
a queue whose work posts each task's prediction to Label Studio's API (``POST /api/predictions/``), under the
model version ``/setup`` reports, so that Label Studio's own "already predicted" filter skips those tasks
next time.

Two queues, one unit of work (``Preannotation``, JSON):

- ``SpoolQueue`` (embedded mode): a directory ``pending/ running/ failed/`` of one JSON file per task, worked
  by a thread in every backend process. A file is claimed by an atomic rename; a process that dies leaves its
  claimed files, which the next start puts back. A task that fails keeps its file in ``failed/``.
- ``RQQueue`` (RQ mode): RQ jobs on the workers' bulk queue (clicks go first), retried by RQ; the worker runs
  the automatic masks in its batched pass and posts the prediction (``workers.tasks.preannotate``). A job
  that fails every retry stays in RQ's failed registry.

Progress (queued, running, posted, skipped, failed, the last error) is in ``/health`` and the log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from serving.jobs import SegmentJob
from serving.labels import parse_config
from serving.options import ProjectOptions
from serving.predictions import ProjectPredictions
from serving.statefiles import parse_json_object, pid_alive, read_json

if TYPE_CHECKING:
    from serving.labelstudio_api import LabelStudioClient

log = logging.getLogger(__name__)

PREANNOTATE_JOB = "workers.tasks.preannotate"  # run by the inference workers, named, not imported


class PreannotationError(RuntimeError):
    """A task whose automatic masks could not be computed (the job's error)."""


@dataclass(frozen=True)
class Preannotation:
    """One task to pre-annotate: everything needed without the request that asked for it."""

    task_id: int
    image_url: str  # as the job fetches it (a cloud URI already turned into Label Studio's presign URL)
    image_key: str
    label_config: str
    options: dict  # ProjectOptions.to_dict()
    model_version: str  # the version /setup reports: Label Studio filters "already predicted" tasks by it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preannotation":
        return cls(**data)

    @property
    def predictions(self) -> ProjectPredictions:
        options = ProjectOptions().updated({k: v for k, v in self.options.items() if v is not None})
        return ProjectPredictions(parse_config(self.label_config), options)

    def segment_job(self) -> SegmentJob:
        predictions = self.predictions
        return SegmentJob(image_url=self.image_url, image_key=self.image_key, output=predictions.output,
                          auto=predictions.auto)


def post(item: Preannotation, result: dict, client: "LabelStudioClient") -> str:
    """Post the task's prediction from its job's ``result``: ``"posted"``, or ``"skipped"`` when the task has a
    prediction of this model version already (Label Studio answered the same task inline meanwhile)."""
    if "error" in result:
        raise PreannotationError(result["error"])
    if item.model_version in client.prediction_versions(item.task_id):
        return "skipped"
    prediction = item.predictions.automatic(item.image_url, result, item.model_version)
    client.post_prediction(item.task_id, dict(prediction, model_version=item.model_version))
    return "posted"


class _Counters:
    """Counts shared by the processes of one backend: a small JSON file updated under an exclusive lock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, error: str | None = None, **counts: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            data = parse_json_object(f.read())
            for name, value in counts.items():
                data[name] = data.get(name, 0) + value
            if error is not None:
                data["last_error"] = error
            f.seek(0)
            f.truncate()
            f.write(json.dumps(data))

    def read(self) -> dict:
        return read_json(self.path)


class SpoolQueue:
    """The embedded mode's queue: files in ``directory``, worked by ``start(run)``'s thread in each process."""

    def __init__(self, directory: Path, idle_s: float = 0.5) -> None:
        self.directory = Path(directory)
        self.pending, self.running, self.failed = (self.directory / name for name in ("pending", "running", "failed"))
        for folder in (self.pending, self.running, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.counters = _Counters(self.directory / "counts.json")
        self.idle_s = idle_s
        self._wake = threading.Event()

    def submit(self, items: list[Preannotation]) -> None:
        for item in items:
            name = f"{time.time_ns():020d}-{item.task_id}-{uuid.uuid4().hex[:6]}.json"
            temporary = self.directory / f".{name}"
            temporary.write_text(json.dumps(item.to_dict()))
            os.replace(temporary, self.pending / name)  # whole files only: a reader never sees half a job
        self.counters.add(submitted=len(items))
        log.info("pre-annotation: %d task(s) queued for the background", len(items))
        self._wake.set()

    def progress(self) -> dict:
        counts = self.counters.read()
        return {"mode": "thread", "queued": _count(self.pending), "running": _count(self.running),
                "failed_tasks": _count(self.failed), **counts}

    def start(self, run: Callable[[Preannotation], str]) -> threading.Thread:
        """Work the queue with ``run`` (an item -> "posted" | "skipped") in a daemon thread."""
        self._recover()
        thread = threading.Thread(target=self._work, args=(run,), name="preannotation", daemon=True)
        thread.start()
        return thread

    def _recover(self) -> None:
        """Put back what a dead process had claimed."""
        for path in self.running.glob("*.json"):
            pid = path.name.split("--", 1)[0]
            if pid.isdigit() and not pid_alive(pid):
                os.replace(path, self.pending / path.name.split("--", 1)[1])
                log.info("pre-annotation: %s put back (its process %s is gone)", path.name, pid)

    def _claim(self) -> Path | None:
        for path in sorted(self.pending.glob("*.json")):
            claimed = self.running / f"{os.getpid()}--{path.name}"
            try:
                os.rename(path, claimed)  # atomic: exactly one process gets it
            except FileNotFoundError:
                continue
            return claimed
        return None

    def _work(self, run: Callable[[Preannotation], str]) -> None:
        while True:
            claimed = self._claim()
            if claimed is None:
                self._wake.wait(self.idle_s)
                self._wake.clear()
                continue
            try:
                item = Preannotation.from_dict(json.loads(claimed.read_text()))
                outcome = run(item)
            except Exception as error:  # noqa: BLE001 - recorded; the file stays in failed/
                message = f"{claimed.name.split('--', 1)[1]}: {error.__class__.__name__}: {error}"
                log.warning("pre-annotation failed: %s", message)
                os.replace(claimed, self.failed / claimed.name.split("--", 1)[1])
                self.counters.add(failed=1, error=message)
                continue
            claimed.unlink()
            self.counters.add(**{outcome: 1})
            log.info("pre-annotation: task %s %s", item.task_id, outcome)


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.json"))


class RQQueue:
    """The RQ mode's queue: jobs on the workers' shared bulk queue; counts in a Redis hash."""

    RETRIES = 3

    def __init__(self, redis, keys) -> None:
        self.redis = redis
        self.keys = keys

    def submit(self, items: list[Preannotation]) -> None:
        from rq import Queue, Retry
        from rq.serializers import JSONSerializer

        queue = Queue(self.keys.shared_bulk_queue, connection=self.redis, serializer=JSONSerializer)
        with self.redis.pipeline() as pipe:
            for item in items:
                payload = {"kind": "preannotate", "job": item.segment_job().to_dict(), "preannotation": item.to_dict()}
                queue.enqueue(PREANNOTATE_JOB, kwargs={"payload": payload},
                              job_id=f"preannotate-{item.task_id}-{uuid.uuid4().hex[:8]}",
                              retry=Retry(max=self.RETRIES), job_timeout=600, result_ttl=600,
                              failure_ttl=7 * 24 * 3600, description=f"preannotate task {item.task_id}",
                              pipeline=pipe)
            pipe.hincrby(self.keys.preannotation, "submitted", len(items))
            pipe.execute()
        log.info("pre-annotation: %d task(s) queued on %s", len(items), self.keys.shared_bulk_queue)

    def progress(self) -> dict:
        counts = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.preannotation).items()}
        return {"mode": "rq", **{k: (int(v) if v.isdigit() else v) for k, v in counts.items()}}


def create_queue(settings, segmenter, fetcher) -> SpoolQueue | RQQueue | None:
    """The deployment's background queue (RQ jobs with Redis, else a spool worked in this process), or None
    when the backend cannot post to Label Studio (no LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)."""
    from serving.labelstudio_api import LabelStudioClient

    if not LabelStudioClient.available(fetcher):
        log.info("background pre-annotation is off: it posts through Label Studio's API, which needs "
                 "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return None
    if settings.redis_url:
        from serving.config import connect

        return RQQueue(connect(settings.redis_url), settings.rq.keys)
    queue = SpoolQueue(Path(settings.model_dir) / "preannotation")
    client = LabelStudioClient(fetcher)
    queue.start(lambda item: post(item, segmenter.segment([item.segment_job()], bulk=True)[0], client))
    return queue


def record_outcome(redis, keys, outcome: str | None = None, error: str | None = None) -> None:
    """A worker's count of one finished (or finally failed) RQ pre-annotation job."""
    with redis.pipeline() as pipe:
        pipe.hincrby(keys.preannotation, outcome or "failed", 1)
        if error is not None:
            pipe.hset(keys.preannotation, "last_error", error[:500])
        pipe.execute()

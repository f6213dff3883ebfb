"""Enqueueing the DLD training job (one fixed job id, so every trigger is idempotent)."""

from __future__ import annotations

import logging
import time

from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from serving.config import WorkerSettings

log = logging.getLogger(__name__)

TRAINING_FUNC = "workers.training.run_training"
_ACTIVE_STATES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def training_queue(redis, settings: WorkerSettings) -> Queue:
    return Queue(settings.keys.training_queue, connection=redis, serializer=JSONSerializer)


def enqueue_training(redis, settings: WorkerSettings, reason: str) -> Job:
    """The DLD job: the queued/running one if there is one, else a fresh one with the same id."""
    job_id = settings.keys.training_job_id
    queue = training_queue(redis, settings)
    for _ in range(3):
        try:
            existing = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            existing = None
        if existing is not None:
            if existing.get_status() in _ACTIVE_STATES:
                return existing
            existing.delete()  # finished / failed / stopped: the next run reuses the id
        try:
            job = queue.enqueue(
                TRAINING_FUNC,
                kwargs={"reason": reason, "requested_at": time.time()},
                job_id=job_id,
                unique=True,
                job_timeout=settings.training_timeout_s,
                result_ttl=7 * 24 * 3600,
                failure_ttl=7 * 24 * 3600,
                description=f"DLD fine-tuning ({reason})",
            )
            log.info("enqueued DLD training job %s (%s)", job.id, reason)
            redis.xadd(settings.keys.training_requests, {"reason": reason, "job": job.id}, maxlen=1000)
            return job
        except DuplicateJobError:
            continue  # another process enqueued it between our fetch and enqueue: look again
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)

"""Job functions named in RQ jobs (JSON-serialised: only their dotted names and JSON arguments travel)."""

from __future__ import annotations

import contextvars

# The inference worker process sets this to its runtime once, in bootstrap(); job functions read it.
# (A context variable, not a module global holding a model: nothing is loaded at import time.)
current_runtime: contextvars.ContextVar = contextvars.ContextVar("samlight_inference_runtime")


def collect_result(payload: dict) -> dict:
    """An inference job's result: the worker computed it already, in its batched pass over the queued jobs
    (see ``InferenceWorker.execute_job``), and published the answer to the waiting backend."""
    from rq import get_current_job

    runtime = current_runtime.get(None)
    if runtime is None:
        raise RuntimeError("workers.tasks.collect_result must run on an InferenceWorker (python -m workers.inference)")
    return runtime.take_result(get_current_job().id)


def preannotate(payload: dict) -> dict:
    """A background pre-annotation: the worker computed the task's automatic masks in its batched pass; post
    them to Label Studio. Raises on failure, so RQ retries it (and keeps it in its failed registry after the
    last retry, counted in ``/health``)."""
    from rq import get_current_job

    from serving.labelstudio_api import LabelStudioClient
    from serving.preannotation import Preannotation, post, record_outcome

    runtime = current_runtime.get(None)
    if runtime is None:
        raise RuntimeError("workers.tasks.preannotate must run on an InferenceWorker (python -m workers.inference)")
    job = get_current_job()
    item = Preannotation.from_dict(payload["preannotation"])
    try:
        outcome = post(item, runtime.take_result(job.id), LabelStudioClient(runtime.fetcher))
    except Exception as error:
        if not job.retries_left:
            record_outcome(runtime.redis, runtime.settings.keys, error=f"task {item.task_id}: {error}")
        raise
    record_outcome(runtime.redis, runtime.settings.keys, outcome)
    return {"task": item.task_id, "outcome": outcome}


# the name backends of the previous release enqueue: keeps clicks working during a rolling upgrade
segment = collect_result

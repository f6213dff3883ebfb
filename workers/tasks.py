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


# the name backends of the previous release enqueue: keeps clicks working during a rolling upgrade
segment = collect_result

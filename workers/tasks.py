"""Job functions named in RQ jobs (JSON-serialised: only their dotted names and JSON arguments travel)."""

from __future__ import annotations

import contextvars

# The inference worker process sets this to its runtime once, in bootstrap(); job functions read it.
# (A context variable, not a module global holding a model: nothing is loaded at import time.)
current_runtime: contextvars.ContextVar = contextvars.ContextVar("samlight_inference_runtime")


def segment(payload: dict) -> dict:
    """One click or prewarm; the worker already computed it in its batched pass (see InferenceWorker)."""
    from rq import get_current_job

    runtime = current_runtime.get(None)
    if runtime is None:
        raise RuntimeError("workers.tasks.segment must run on an InferenceWorker (python -m workers.inference)")
    return runtime.take_result(get_current_job().id)

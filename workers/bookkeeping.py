"""RQ's per-job bookkeeping on a thread of its own, off the click path.

After a batch's answers are on their reply lists, RQ still records every job: execution, registries, status,
result, counters; about twenty Redis round trips, several milliseconds of wall time per job. Run inline, that
delayed every click queued behind the batch by the sum (tens of ms for a batch of eight). Here the worker hands the
batch over and goes back to its queues; one thread runs RQ's own ``execute_job`` for each job in order, so
``rq info``, the registries and the results read exactly as before, a little later.

The hand-over queue is bounded: a worker whose bookkeeping cannot keep up (Redis overloaded) slows down
instead of holding an unbounded backlog of finished jobs.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("workers.bookkeeping")

_STOP = object()


class Bookkeeping:
    """One daemon thread that calls ``record(job, queue)`` for each handed-over job, in order."""

    def __init__(self, record: Callable, name: str, max_batches: int = 64) -> None:
        self.record = record
        self.batches: queue.Queue = queue.Queue(maxsize=max_batches)
        # the job functions read the worker's runtime from a context variable: the thread runs in a copy
        # of the starting thread's context (a new thread would start with an empty one)
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run,), name=f"{name}-bookkeeping",
                                       daemon=True)
        self.thread.start()

    def submit(self, batch: list[tuple]) -> None:
        self.batches.put(batch)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Record what was handed over, then end the thread (a warm shutdown loses no job's record)."""
        try:
            self.batches.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.error("bookkeeping thread is stuck; %d batches not recorded", self.batches.qsize())
            return
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = self.batches.get()
            if batch is _STOP:
                return
            for job, origin in batch:
                try:
                    self.record(job, origin)
                except Exception as error:  # Redis failing: the answers went out already; the work loop restarts
                    log.warning("could not record job %s: %s: %s", job.id, error.__class__.__name__, error)

"""workers.bookkeeping: RQ's per-job records, on a thread of their own, in order, never lost on a warm stop."""

from __future__ import annotations

import contextvars
import threading
from types import SimpleNamespace

from workers.bookkeeping import Bookkeeping

runtime = contextvars.ContextVar("runtime")


def test_records_every_job_in_order_on_its_own_thread_and_survives_a_failing_one(caplog):
    runtime.set("the worker's runtime")
    seen = []
    release = threading.Event()

    def record(job, origin):
        release.wait(10)  # slow bookkeeping: submit() must not wait for it
        if job.id == "bad":
            raise ConnectionError("redis went away")
        seen.append((job.id, origin, runtime.get(None), threading.current_thread().name))

    bookkeeping = Bookkeeping(record, "w0")
    for n in range(3):
        bookkeeping.submit([(SimpleNamespace(id=f"j{n}a"), "clicks"), (SimpleNamespace(id=f"j{n}b"), "bulk")])
    bookkeeping.submit([(SimpleNamespace(id="bad"), "clicks"), (SimpleNamespace(id="after"), "clicks")])
    assert not seen  # nothing recorded yet: the worker went on without waiting for it
    release.set()
    bookkeeping.stop()  # a warm stop records everything handed over first
    assert not bookkeeping.thread.is_alive()
    assert [job for job, *_ in seen] == ["j0a", "j0b", "j1a", "j1b", "j2a", "j2b", "after"]
    assert all(value == "the worker's runtime" and thread == "w0-bookkeeping" for *_, value, thread in seen)
    assert [origin for _, origin, *_ in seen[:2]] == ["clicks", "bulk"]
    assert "could not record job bad: ConnectionError: redis went away" in caplog.text

"""Where Label Studio's webhook events go, and how corrected brush masks come back out of them.

``CorrectionSink.record(event)`` stores one webhook payload durably before the backend acknowledges it.
``FileCorrectionSink`` appends one JSON line per event to ``MODEL_DIR/corrections/events.jsonl`` and fsyncs
it (safe across gunicorn workers: one ``O_APPEND`` write under an exclusive lock). It is the embedded mode's
corrections log, which its learning loop trains from (``serving.local_training``); in RQ mode the corrections
live in Redis (``serving.correction_stream``), whose local fallback for a Redis outage uses the same log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable


from serving.errors import StatusError
from serving.statefiles import write_text_atomically

RECORDED_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                             "START_TRAINING"})


class EventError(StatusError):
    """A webhook payload that cannot be a Label Studio event of its action (400); nothing is stored."""


def _annotation(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise EventError(f"{where} must be an object, got {type(value).__name__}")
    identity = value.get("id")
    if isinstance(identity, bool) or not isinstance(identity, (int, str)) or identity == "":
        raise EventError(f"{where}.id is required (a number or a string), got {identity!r}")
    if not isinstance(value.get("result", []), list):
        raise EventError(f"{where}.result must be a list")
    return value


def _task(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError(f"{where} must be an object, got {type(value).__name__}")
    if not isinstance(value.get("data", {}), dict):
        raise EventError(f"{where}.data must be an object, got {type(value.get('data')).__name__}")
    return value


def webhook_events(payload: dict) -> list[dict]:
    """The events to record for one webhook payload, checked; ``[]`` for actions that are not recorded.

    A bulk ``ANNOTATIONS_CREATED`` (Label Studio's "predictions to annotations", imports) becomes one
    ``ANNOTATION_CREATED`` per annotation, each with its own task, so it is stored like a single one.
    """
    action = payload.get("action")
    if action not in RECORDED_EVENTS:
        return []
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        _annotation(payload.get("annotation"), "annotation")
        _task(payload.get("task"), "task")
        return [payload]
    if action == "ANNOTATIONS_CREATED":
        annotations, tasks = payload.get("annotation"), payload.get("task") or []
        if not isinstance(annotations, list) or not isinstance(tasks, list):
            raise EventError("ANNOTATIONS_CREATED needs 'annotation' (and 'task') as lists")
        by_id = {t.get("id"): t for t in (_task(t, "task[]") for t in tasks)}
        events = []
        for index, annotation in enumerate(annotations):
            annotation = _annotation(annotation, f"annotation[{index}]")
            task = by_id.get(annotation.get("task"), {"id": annotation.get("task")})
            events.append({"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task,
                           "project": payload.get("project")})
        return events
    if action == "ANNOTATIONS_DELETED":
        deleted = payload.get("annotations")
        if not isinstance(deleted, list):
            raise EventError("ANNOTATIONS_DELETED needs 'annotations' as a list")
        for index, annotation in enumerate(deleted):
            _annotation(annotation, f"annotations[{index}]")
    return [payload]


@runtime_checkable
class CorrectionSink(Protocol):
    def record(self, event: dict) -> None:
        """Store ``event`` (a webhook payload with ``action``) durably; raise if it could not be stored."""


class EventLog:
    """An append-only JSON-lines file of webhook events, fsynced before ``append`` returns. One line per event:
    ``{"received_at": t, "event": {...}}``. Appends and drains take an exclusive ``flock`` on a lock file beside
    it (``PATH.lock``), so that they are safe across processes (gunicorn workers) and a drain can replace the log
    atomically: a reader or a crash sees the old log or the new one, never an empty one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, event: dict) -> None:
        data = (json.dumps({"received_at": time.time(), "event": event}, separators=(",", ":")) + "\n").encode()
        with self._locked():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def events(self) -> Iterator[dict]:
        """The logged events in order (a torn last line, from a crash mid-write, is skipped)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                event = _logged_event(line)
                if event is not None:
                    yield event

    def pending(self) -> int:
        try:
            with open(self.path, encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    def drain(self, apply) -> int:
        """``apply`` every logged event in order; the log keeps only what was not applied (``apply`` raised)."""
        if not self.path.exists():
            return 0
        with self._locked():
            lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            done = 0
            try:
                for line in lines:
                    event = _logged_event(line)
                    if event is not None:  # a torn line from a crash is dropped
                        apply(event)
                    done += 1
            finally:
                if done:
                    write_text_atomically(self.path, "".join(line + "\n" for line in lines[done:]))
        return done


def _logged_event(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    event = record.get("event", record)  # logs written before 2026-12 held the bare event
    return event if isinstance(event, dict) else None


class FileCorrectionSink:
    """The embedded backend's sink: ``MODEL_DIR/corrections/events.jsonl``."""

    FILENAME = "events.jsonl"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.log = EventLog(self.directory / self.FILENAME)

    def record(self, event: dict) -> None:
        self.log.append(event)

    def events(self) -> Iterator[dict]:
        return self.log.events()


def create_correction_sink(settings) -> CorrectionSink:
    """Where a backend stores webhook events: the Redis stream when Redis is configured (falling back to a local
    log while Redis is down), else the fsynced file log."""
    if settings.redis_url:
        from serving.correction_stream import RedisCorrectionSink

        return RedisCorrectionSink(settings.rq)
    return FileCorrectionSink(settings.corrections_dir)

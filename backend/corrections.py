"""Where Label Studio's webhook events go, and how corrected brush masks come back out of them.

``CorrectionSink.record(event)`` stores one webhook payload durably before the backend acknowledges it.
``FileCorrectionSink`` appends one JSON line per event to ``MODEL_DIR/corrections/events.jsonl`` and fsyncs
it (safe across gunicorn workers: one ``O_APPEND`` write under an exclusive ``flock``). Workers add a Redis
stream sink that falls back to this file when Redis is down.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from backend.rle import rle_to_mask

RECORDED_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"})


@runtime_checkable
class CorrectionSink(Protocol):
    def record(self, event: dict) -> None:
        """Store ``event`` (a webhook payload with ``action``) durably; raise if it could not be stored."""


class FileCorrectionSink:
    FILENAME = "events.jsonl"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME

    def record(self, event: dict) -> None:
        line = json.dumps({"received_at": time.time(), "event": event}, separators=(",", ":")) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = line.encode()
            while data:
                written = os.write(fd, data)
                data = data[written:]
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    def events(self) -> Iterator[dict]:
        """The recorded events in order (a torn last line, from a crash mid-write, is skipped)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)["event"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue


def annotation_masks(annotation: dict) -> list[dict]:
    """The brush masks of a Label Studio annotation (or prediction) as arrays.

    Returns ``[{"from_name", "to_name", "labels", "mask": (H, W) uint8 0/255, "id"}]``.
    """
    masks = []
    for item in annotation.get("result") or []:
        if not isinstance(item, dict) or item.get("type", "").lower() != "brushlabels":
            continue
        value = item.get("value") or {}
        if value.get("format") != "rle" or "rle" not in value:
            continue
        height, width = int(item["original_height"]), int(item["original_width"])
        masks.append({"id": item.get("id"), "from_name": item.get("from_name"), "to_name": item.get("to_name"),
                      "labels": list(value.get("brushlabels") or []),
                      "mask": rle_to_mask(value["rle"], height, width).astype(np.uint8)})
    return masks

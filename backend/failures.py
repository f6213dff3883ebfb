"""The backend's recent failures, for ``/health``: Label Studio shows an annotator nothing when a click fails
(it answers the browser ``200 {"errors": [...]}`` and drops it), so an operator has to be able to see them."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class RecentFailures:
    """A count of failed requests per endpoint and the last few messages; thread-safe, per process."""

    def __init__(self, keep: int = 20) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, endpoint: str, status: int, message: str) -> None:
        with self._lock:
            self._counts[endpoint] = self._counts.get(endpoint, 0) + 1
            self._recent.append({"time": round(time.time(), 3), "endpoint": endpoint, "status": status,
                                 "message": message[:500]})

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"count": sum(self._counts.values()), "by_endpoint": dict(self._counts),
                    "recent": list(self._recent)[::-1]}

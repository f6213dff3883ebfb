"""What the next click on the same object refines: the low-resolution mask logits of recent clicks.

SAM was trained interactively: each click after the first gets the previous prediction's low-resolution
logits (1×256×256) as ``mask_input``. The backend names every click's prompt set (``click_key``); the process
that ran the click (the embedded backend, or the RQ worker that holds the image's embedding) keeps its
logits here, and a click whose prompt set extends a remembered one by one prompt refines it. Bounded: an
entry is 256 KB (float32; on the model's device), ``max_entries`` of them at most.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict


def click_key(image_key: str, prompts: list[str]) -> str:
    """The name of a prompt set on an image (``prompts``: each prompt's identity, in the order they came)."""
    return hashlib.sha1(json.dumps([image_key, prompts]).encode()).hexdigest()[:24]


class MaskMemory:
    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.refined = 0  # clicks that found their previous mask

    def get(self, key: str | None):
        if key is None:
            return None
        with self._lock:
            logits = self._entries.get(key)
            if logits is not None:
                self._entries.move_to_end(key)
                self.refined += 1
            return logits

    def put(self, key: str | None, logits) -> None:
        if key is None or self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = logits
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __contains__(self, key: str | None) -> bool:
        with self._lock:
            return key is not None and key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "refined": self.refined}

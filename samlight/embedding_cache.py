"""A thread-safe LRU cache of image embeddings, bounded by entry count and bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageEmbedding:
    """What the mask decoder needs of an image: its features and its sizes."""

    features: torch.Tensor  # (1, 256, g, g) on the model's device
    original_size: tuple[int, int]  # (H, W) of the image as given
    input_size: tuple[int, int]  # (h, w) after resizing the longest side, before padding

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class EmbeddingCache:
    def __init__(self, max_entries: int = 64, max_bytes: int = 1 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, embedding: ImageEmbedding) -> None:
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            if embedding.nbytes > self.max_bytes or self.max_entries < 1:
                return
            self._entries[key] = embedding
            self._bytes += embedding.nbytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / total if total else 0.0,
            }

"""On-disk cache of teacher features (mapped block outputs + neck output), fp16, one file per image.

Keyed by the image's content hash, the teacher's identity, the input size and the mapped blocks, so a
cache directory can be shared by any number of runs and teachers. Writes are atomic (temporary file,
fsync, rename): a run killed mid-write leaves at worst a stray temporary file, removed at the next
start. The cache is bounded by bytes; least recently used files go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors raise plain exceptions
    SafetensorError = ValueError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_TEMP_SECONDS = 3600


class TeacherFeatureCache:
    def __init__(self, directory: str | os.PathLike, teacher_identity: str, max_bytes: int = 50 << 30) -> None:
        self.directory = Path(directory)
        self.teacher_identity = teacher_identity
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._bytes = self._scan()

    def key(self, image_key: str, img_size: int, blocks: list[int]) -> str:
        text = f"{self.teacher_identity}|{img_size}|{','.join(map(str, blocks))}|{image_key}"
        return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def _scan(self) -> int:
        total = 0
        now = time.time()
        for path in self.directory.rglob("*"):
            if not path.is_file():
                continue
            if path.name.startswith(".tmp-"):
                # left behind by a killed writer (writers finish in seconds)
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    path.unlink(missing_ok=True)
                continue
            if path.suffix == SUFFIX:
                total += path.stat().st_size
        return total

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        try:
            tensors = load_file(path)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (SafetensorError, OSError, RuntimeError) as error:
            log.warning("teacher feature cache: dropping unreadable %s (%s)", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        try:
            os.utime(path)  # recency for eviction
        except OSError:
            pass
        self.hits += 1
        return tensors

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        half = {name: t.detach().to("cpu", torch.float16).contiguous() for name, t in tensors.items()}
        for name, t in half.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"teacher feature {name} overflows float16; cannot cache it")
        temp = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}"
        try:
            save_file(half, temp)
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            size = temp.stat().st_size
            existed = path.exists()
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        with self._lock:
            if not existed:
                self._bytes += size
            over = self._bytes > self.max_bytes
        if over:
            self.evict()

    def evict(self) -> int:
        """Delete least recently used files until the cache fits ``max_bytes``; returns files removed."""
        with self._lock:
            files = []
            for p in self.directory.rglob(f"*{SUFFIX}"):
                if p.name.startswith(".tmp-"):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
            files.sort()
            total = sum(size for _, size, _ in files)
            removed = 0
            for _, size, p in files:
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= size
                removed += 1
            self._bytes = total
        if removed:
            log.info("teacher feature cache: evicted %d files to stay under %d bytes", removed, self.max_bytes)
        return removed

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "bytes": self._bytes,
                "hit_rate": self.hits / total if total else 0.0}

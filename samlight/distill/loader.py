"""A thread-based loader: items are prepared by a thread pool, batches prefetched in order.

Threads rather than DataLoader processes: image decoding, resizing and reading teacher features from
disk release the GIL, and tens of megabytes of features per image never pass through shared memory
(which containers often keep small).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

_DONE = object()


class ThreadLoader:
    def __init__(self, get: Callable[[int], dict], positions: list[int], batch_size: int, workers: int,
                 depth: int = 3) -> None:
        self.get = get
        self.batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
        self.workers = workers
        self.depth = depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[list[dict]]:
        if self.workers <= 0:
            for batch in self.batches:
                yield [self.get(p) for p in batch]
            return
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(out,), daemon=True, name="distill-loader")
        self._thread.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _produce(self, out: queue.Queue) -> None:
        def put(value) -> bool:
            while not self._stop.is_set():
                try:
                    out.put(value, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="distill-data") as pool:
                pending = []
                for batch in self.batches:
                    # keep `depth` batches in flight so the pool works ahead of the trainer
                    pending.append([pool.submit(self.get, p) for p in batch])
                    if len(pending) < self.depth:
                        continue
                    if not put([f.result() for f in pending.pop(0)]):
                        return
                for futures in pending:
                    if not put([f.result() for f in futures]):
                        return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    def close(self) -> None:
        self._stop.set()

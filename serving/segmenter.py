"""Where segmentation jobs run: the ``Segmenter`` protocol and the embedded, in-process implementation.

``create_segmenter(settings)`` picks the implementation: with ``REDIS_URL`` set, ``serving.remote.RQSegmenter``
(imported lazily, so the request path never imports torch); otherwise ``InProcessSegmenter``, which loads one
model per process on first use (or in a background thread at startup) and shares its embedding cache between
the process's threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from serving.config import EmbeddedSettings, Settings
from serving.images import FetchError, ImageFetcher
from serving.source import ModelSource
from serving.jobs import JobError, SegmentJob, error_result, execute
from serving.engine import ModelHolder, PredictorSettings, Served
from serving.refinement import MaskMemory
from serving.registry import ModelRegistry

log = logging.getLogger(__name__)


@runtime_checkable
class Segmenter(Protocol):
    """What the Flask app needs from an inference engine. Implementations must be thread-safe."""

    @property
    def model_version(self) -> str:
        """The active model's version; cheap (never loads a model)."""

    def segment(self, jobs: list[SegmentJob], bulk: bool = False) -> list[dict]:
        """One result dict per job, in order (``jobs.execute``'s dict, or ``{"error": msg, "status": code}``);
        ``bulk`` work (background pre-annotation) waits behind clicks."""

    def prewarm(self, jobs: list[SegmentJob]) -> None:
        """Start computing the jobs' image embeddings; returns at once, best effort."""

    def health(self) -> dict:
        """A small JSON-able status; must answer fast even while inference runs."""

    def versions(self) -> list[str]:
        """Known model versions, the active one first."""


class _KeyLocks:
    """One lock per image key, so that a click and a prewarm of the same image embed it once."""

    def __init__(self) -> None:
        self._locks: dict[str, list] = {}  # key -> [lock, users]
        self._guard = threading.Lock()

    def __call__(self, key: str):
        return _KeyLock(self, key)


class _KeyLock:
    def __init__(self, owner: _KeyLocks, key: str) -> None:
        self.owner, self.key = owner, key

    def __enter__(self):
        with self.owner._guard:
            entry = self.owner._locks.setdefault(self.key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()
        self.entry = entry

    def __exit__(self, *exc):
        self.entry[0].release()
        with self.owner._guard:
            self.entry[1] -= 1
            if self.entry[1] == 0:
                self.owner._locks.pop(self.key, None)


class ClickFirstSlots:
    """``n`` inference slots; a click waiting for one always goes before bulk work (prewarm)."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.clicks_waiting = 0
        self._condition = threading.Condition()

    @contextmanager
    def take(self, click: bool, timeout_s: float):
        with self._condition:
            self.clicks_waiting += click
            try:
                ready = self._condition.wait_for(
                    lambda: self.free > 0 and (click or self.clicks_waiting == 0), timeout_s)
            finally:
                self.clicks_waiting -= click
            if not ready:
                raise JobError(f"the model is busy: no inference slot came free within {timeout_s:g}s", 503)
            self.free -= 1
        try:
            yield
        finally:
            with self._condition:
                self.free += 1
                self._condition.notify_all()


class InProcessSegmenter:
    """The embedded default: a ``Predictor`` in this process, loaded once, shared by all request threads."""

    PREWARM_SLOT_WAIT_S = 60.0  # bulk work waits behind clicks this long before it is dropped

    RELOAD_CHECK_S = 2.0  # how often the registry's active version is looked at

    def __init__(self, settings: EmbeddedSettings, source: ModelSource, fetcher: ImageFetcher,
                 registry: ModelRegistry | None = None) -> None:
        source.validate()
        self.settings = settings
        self.source = source
        self.fetcher = fetcher
        # a version the learning loop published wins over the configured model, and replaces it while serving
        self.registry = registry if source.test_model is None else None
        self._version = self._active() or source.version()  # cheap; a SAM .pth is hashed once here, at startup
        self._failed_versions: set[str] = set()
        self.holder = ModelHolder(PredictorSettings(settings.device, settings.cache_entries, settings.cpu_fast,
                                                    settings.cpu_int8), settings.refine_entries)
        self._load_lock = threading.Lock()
        self._load_error: str | None = None
        self._key_locks = _KeyLocks()
        self._slots = ClickFirstSlots(settings.inference_slots)
        self._prewarm_pool = ThreadPoolExecutor(settings.prewarm_threads, thread_name_prefix="prewarm")
        self._inflight = 0
        self._prewarm_pending = 0
        self._counter_lock = threading.Lock()
        self.started = time.time()

    # --- model --------------------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return self._version

    def versions(self) -> list[str]:
        published = [v.version for v in self.registry.versions()] if self.registry is not None else []
        return [self.model_version] + [v for v in published if v != self.model_version]

    @property
    def loaded(self) -> bool:
        return self.holder.served is not None

    @property
    def memory(self) -> MaskMemory:
        return self.holder.memory

    def predictor(self):
        """The process's predictor, loading the model on first use (torch is imported only here)."""
        if self.holder.served is None:
            with self._load_lock:
                if self.holder.served is None:
                    self.holder.swap(self._load())
                    if self.registry is not None:
                        threading.Thread(target=self._follow_registry, name="model-reload", daemon=True).start()
        return self.holder.served.predictor

    def _active(self) -> str | None:
        try:
            return self.registry.active() if self.registry is not None else None
        except OSError:
            return None

    def _load(self) -> Served:
        if self.source.test_model is not None:
            from serving.testing import GeometryPredictor

            log.warning("SERVING THE TEST-ONLY GEOMETRY MODEL (SAMLIGHT_TEST_MODEL): boxes and discs, not SAM")
            return Served(GeometryPredictor(), self._version)
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        start = time.perf_counter()
        try:
            active = self._active()
            served = self._build(active) if active else self.holder.build(*self.source.load())
        except Exception as error:  # surfaced by /health and every request
            self._load_error = f"{error.__class__.__name__}: {error}"
            log.error("cannot load the model: %s", self._load_error)
            raise
        self._version = served.version
        log.info("model %s loaded and warmed up on %s in %.1fs (pid %d)", served.version, served.predictor.device,
                 time.perf_counter() - start, os.getpid())
        return served

    def load_in_background(self) -> threading.Thread:
        def load():
            try:
                self.predictor()
            except Exception:  # noqa: BLE001 - already logged, reported by health()
                pass

        thread = threading.Thread(target=load, name="model-load", daemon=True)
        thread.start()
        return thread

    def _build(self, version: str) -> Served:
        """A registry version's predictor, warmed up (not served until swapped in)."""
        return self.holder.build(self.registry.load(version).model, version)

    def _follow_registry(self) -> None:
        """Hot reload: a newly activated version is loaded and warmed up beside the served one, then swapped
        in; clicks keep being answered by the old model meanwhile. A version that fails to load is left."""
        while True:
            time.sleep(self.RELOAD_CHECK_S)
            active = self._active()
            if not active or active == self._version or active in self._failed_versions or not self.loaded:
                continue
            started = time.perf_counter()
            try:
                served = self._build(active)
            except Exception as error:  # noqa: BLE001 - the old model keeps serving
                self._failed_versions.add(active)
                log.error("cannot load the newly active version %s, still serving %s: %s", active, self._version,
                          error)
                continue
            with self._load_lock:
                self.holder.swap(served)
                self._version = active
            log.info("now serving %s (loaded and warmed up in %.1fs, pid %d)", active,
                     time.perf_counter() - started, os.getpid())

    # --- jobs ---------------------------------------------------------------------------------

    def _run(self, job: SegmentJob, bulk: bool = False) -> dict:
        with self._counter_lock:
            self._inflight += 1
        try:
            predictor = self.predictor()
            click = not (job.prewarm_only or bulk)
            wait_s = self.settings.slot_wait_s if click else self.PREWARM_SLOT_WAIT_S
            with self._key_locks(job.image_key):
                timings, image = {}, None
                if not predictor.is_cached(job.image_key):
                    # downloaded outside the inference slots: a slow image server holds up only its own clicks
                    start = time.perf_counter()
                    image = self.fetcher.fetch(job.image_url)
                    timings["fetch"] = (time.perf_counter() - start) * 1000
                with self._slots.take(click, wait_s):  # one slot for the embedding and the mask
                    if image is not None:
                        start = time.perf_counter()
                        predictor.embed(image, key=job.image_key)
                        timings["embed"] = (time.perf_counter() - start) * 1000
                    result = execute(job, predictor, self.fetcher, self.model_version, self.memory)
                result["cached"] = image is None
                result["timings_ms"] = {**timings, **result.get("timings_ms", {})}
                return result
        except (JobError, FetchError) as error:
            return error_result(error)
        except Exception as error:  # noqa: BLE001 - one job's failure must not take the others down
            log.exception("job failed")
            return {"error": f"inference failed: {error.__class__.__name__}: {error}", "status": 500}
        finally:
            with self._counter_lock:
                self._inflight -= 1

    def segment(self, jobs: list[SegmentJob], bulk: bool = False) -> list[dict]:
        return [self._run(job, bulk) for job in jobs]

    def prewarm(self, jobs: list[SegmentJob]) -> None:
        # at most a cache's worth queued: a batch over thousands of tasks must not queue hours of encoding
        # whose embeddings would be evicted before anyone clicks
        for job in jobs:
            with self._counter_lock:
                if self._prewarm_pending >= self.settings.cache_entries:
                    log.info("prewarm queue full (%d): not prewarming %s", self._prewarm_pending, job.image_url)
                    continue
                self._prewarm_pending += 1
            warm = SegmentJob(image_url=job.image_url, image_key=job.image_key, prewarm_only=True)
            future = self._prewarm_pool.submit(self._run, warm)
            future.add_done_callback(self._prewarm_done)

    def _prewarm_done(self, future) -> None:
        with self._counter_lock:
            self._prewarm_pending -= 1
        result = future.result()
        if "error" in result:
            log.warning("prewarm failed: %s", result["error"])

    def health(self) -> dict[str, Any]:
        status: dict[str, Any] = {"mode": "embedded", "model_loaded": self.loaded, "inflight": self._inflight,
                                  "prewarm_pending": self._prewarm_pending, "pid": os.getpid()}
        if self._load_error:
            status["error"] = self._load_error
        if self.holder.served is not None:
            predictor = self.holder.served.predictor
            status["device"] = str(predictor.device)
            status["warm_up_s"] = self.holder.warm_up_s
            status["cache"] = predictor.cache.stats()
            status["refinement"] = self.memory.stats()
        return status


def create_segmenter(settings: Settings, fetcher: ImageFetcher) -> Segmenter:
    """RQ workers when Redis is configured, else the model in this process."""
    if settings.redis_url:
        from serving.remote import RQSegmenter  # lazy: keeps torch off the request path

        return RQSegmenter(settings.rq, fetcher=fetcher)
    return InProcessSegmenter(settings.embedded, settings.model, fetcher, ModelRegistry(settings.model_dir))

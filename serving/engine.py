"""The model side of serving: one model holder for every process, and an inference worker's runtime.

:class:`ModelHolder` turns a loaded model into a warmed-up ``Predictor`` (embedding cache, CPU speed options)
served under its version, with the memory of the last clicks' logits; the embedded backend
(``serving.segmenter``) and each inference worker hold one. A new version is built beside the served one and
swapped in atomically (one attribute assignment): requests in flight keep the :class:`Served` pair they
started with.

One :class:`InferenceRuntime` per worker process: hot reload from the registry, batched execution. A version
that fails to load (corrupt weights, sha256 mismatch, wrong config) is remembered as rejected and the old
model keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from serving.refinement import MaskMemory
from serving.registry import ModelRegistry, RegistryError
from serving.config import WorkerSettings
from serving.source import ModelSource

log = logging.getLogger(__name__)


@dataclass
class Served:
    predictor: object  # samlight.predictor.Predictor
    version: str
    loaded_at: float = field(default_factory=time.time)


def warm_up(predictor, max_batch: int = 1) -> None:
    """Forward passes at the batch sizes micro-batching produces, so that no click pays for lazy
    initialisation or kernel compilation (on CUDA: 1, 2, 4, ... up to ``max_batch``; on CPU: 1)."""
    import numpy as np

    size = predictor.model.image_encoder.img_size
    sizes = [1]
    if predictor.device.type == "cuda":
        while sizes[-1] * 2 <= max_batch:
            sizes.append(sizes[-1] * 2)
        if sizes[-1] != max_batch:
            sizes.append(max_batch)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for n in sizes:
        embeddings = predictor.embed_many([image] * n, [f"__warmup__{i}" for i in range(n)])
    predictor.predict_embedding(embeddings[0], point_coords=np.array([[size / 2, size / 2]]),
                                point_labels=np.array([1]), multimask_output=True)
    predictor.cache.clear()


@dataclass(frozen=True)
class PredictorSettings:
    """How a process builds its predictor (the embedded backend's and the workers' settings both give one)."""

    device: str | None = None  # None: CUDA when available
    cache_entries: int = 64  # embeddings kept (a 1024² image's is 4 MB)
    cpu_fast: bool = False  # on the CPU: bf16 weights and a compiled encoder (samlight.predictor.cpu_encoder_options)
    cpu_int8: bool = False  # on the CPU: int8 linears, compiled
    warm_batch: int = 1  # the largest batch micro-batching makes: warmed up too


class ModelHolder:
    """A process's model: the served (predictor, version) pair, how to build the next one, and the refinement
    memory that goes with it."""

    def __init__(self, settings: PredictorSettings, refine_entries: int) -> None:
        self.settings = settings
        self.served: Served | None = None
        self.memory = MaskMemory(refine_entries)  # the last clicks' logits, for refinement
        self.warm_up_s: float | None = None  # how long the last build's warm-up took

    def build(self, model, version: str) -> Served:
        """A predictor for ``model``, warmed up: no click pays for lazy initialisation or compilation (30-40 s
        for a compiled CPU encoder). Not served until ``swap``."""
        import torch

        from samlight.embedding_cache import EmbeddingCache
        from samlight.predictor import Predictor, cpu_encoder_options, default_device

        device = torch.device(self.settings.device) if self.settings.device else default_device()
        speed = cpu_encoder_options(self.settings.cpu_fast, self.settings.cpu_int8) if device.type == "cpu" else {}
        cache = EmbeddingCache(max_entries=self.settings.cache_entries, max_bytes=self.settings.cache_entries << 23)
        predictor = Predictor(model, device=device, cache=cache, **speed)
        started = time.perf_counter()
        warm_up(predictor, self.settings.warm_batch)
        self.warm_up_s = round(time.perf_counter() - started, 3)
        return Served(predictor, version)

    def swap(self, served: Served) -> None:
        self.served = served  # the atomic swap
        self.memory.clear()  # the old model's logits do not refine the new model's masks


class ImageDownloads:
    """A worker's image downloads, in a small thread pool apart from the model.

    A batch waits at most ``wait_s`` for its images; an image still downloading then (a slow or trickling
    server) answers only its own jobs "still downloading", and keeps downloading in the background (up to the
    fetcher's deadline), so the next click on it finds it ready. Downloaded images wait here until a batch
    embeds them (at most ``keep``).
    """

    def __init__(self, fetcher, threads: int = 4, keep: int = 32) -> None:
        self.fetcher = fetcher
        self.keep = keep
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
        self._pending: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, url: str) -> Future:
        with self._lock:
            future = self._pending.get(url)
            if future is None:
                future = self._pending[url] = self._pool.submit(self.fetcher.fetch, url)
                done = [u for u, f in self._pending.items() if f.done()]
                for stale in done[:max(0, len(done) - self.keep)]:  # downloaded, never embedded: oldest first
                    del self._pending[stale]
            return future

    def wait(self, urls: list[str], wait_s: float) -> dict[str, object]:
        """url -> image, or the fetch's exception; urls still downloading after ``wait_s`` are left out."""
        futures = {url: self.start(url) for url in urls}
        wait(list(futures.values()), timeout=max(0.0, wait_s))
        ready = {}
        with self._lock:
            for url, future in futures.items():
                if future.done():
                    ready[url] = future.exception() or future.result()
                    self._pending.pop(url, None)
        return ready


class BatchFetcher:
    """The fetcher ``run_job`` sees in a batch: the batch's downloaded images (or their errors), so that each
    image is downloaded once."""

    def __init__(self, fetcher, images: dict[str, object]) -> None:
        self.fetcher = fetcher
        self._images = images

    def fetch(self, url: str):
        if url not in self._images:
            self._images[url] = self.fetcher.fetch(url)
        image = self._images[url]
        if isinstance(image, Exception):
            raise image
        return image

    def __getattr__(self, name):
        return getattr(self.fetcher, name)


class InferenceRuntime:
    def __init__(self, settings: WorkerSettings, redis, worker_name: str, device: str,
                 source: ModelSource, fetcher) -> None:
        self.settings = settings
        self.redis = redis
        self.worker_name = worker_name
        self.device = device
        self.source = source
        self.registry = ModelRegistry(settings.model_dir, redis, settings.keys)
        self.fetcher = fetcher
        self.downloads = ImageDownloads(fetcher)
        self.holder = ModelHolder(PredictorSettings(device, settings.cache_entries, settings.cpu_fast,
                                                    settings.cpu_int8, warm_batch=settings.max_batch),
                                  settings.refine_entries)
        self.rejected: dict[str, str] = {}
        self._loading: str | None = None
        self._lock = threading.Lock()
        self._results: dict[str, dict] = {}
        self._stop = threading.Event()
        self.jobs_done = 0
        self.cache_hits = 0
        self.busy = 0  # jobs in the batch being computed (health, tests)
        self.clicks = 0  # click jobs (not prewarm) and how many found their embedding cached
        self.click_hits = 0

    # --- models ---------------------------------------------------------------------------------

    @property
    def served(self) -> Served | None:
        return self.holder.served

    @property
    def memory(self) -> MaskMemory:
        return self.holder.memory

    def load_initial(self) -> Served:
        """The active version; if it cannot be loaded, the last version that served; else the configured model."""
        for version in dict.fromkeys(v for v in (self.registry.active(), self.registry.last_good()) if v):
            try:
                self.holder.swap(self._load_version(version))
                return self.served
            except RegistryError as error:
                self.rejected[version] = str(error)
                log.error("version %s cannot be served (%s)", version, error)
        self.holder.swap(self.holder.build(*self.source.load()))
        return self.served

    def _load_version(self, version: str) -> Served:
        checkpoint = self.registry.load(version)
        try:
            served = self.holder.build(checkpoint.model, version)
        except Exception as error:  # a checkpoint that loads but cannot run (wrong shapes, bad config)
            raise RegistryError(f"version {version} fails its warm-up: {error.__class__.__name__}: {error}") from None
        self.registry.mark_served(version)
        return served

    def check_version(self, wanted: str | None = None) -> None:
        """Start loading the active version in the background if it is not the one served."""
        if wanted is None:
            try:
                value = self.redis.get(self.settings.keys.active_version)
            except Exception:
                return
            wanted = value.decode() if value else None
        if not wanted or self.served is None or wanted == self.served.version or wanted in self.rejected:
            return
        with self._lock:
            if self._loading is not None:
                return
            self._loading = wanted
        threading.Thread(target=self._reload, args=(wanted,), name=f"reload-{wanted}", daemon=True).start()

    def _reload(self, version: str) -> None:
        started = time.monotonic()
        try:
            served = self._load_version(version)
        except Exception as error:  # corrupt / mismatched / unreadable: keep serving the old model
            self.rejected[version] = str(error)
            log.error("rejected model version %s: %s (still serving %s)", version, error,
                      self.served.version if self.served else None)
            self._publish_state(error=f"rejected {version}: {error}")
        else:
            old = self.served.version if self.served else None
            self.holder.swap(served)
            log.info("now serving %s (was %s), loaded in %.2fs", version, old, time.monotonic() - started)
            self._publish_state()
        finally:
            with self._lock:
                self._loading = None

    def _publish_state(self, error: str | None = None) -> None:
        try:
            state = {"version": self.served.version if self.served else None, "rejected": sorted(self.rejected)}
            if error:
                state["error"] = error
            self.redis.set(self.settings.keys.worker_model(self.worker_name), json.dumps(state), ex=3600)
        except Exception:
            pass

    # --- background threads ----------------------------------------------------------------------

    def start_background(self, queue_name: str) -> None:
        # each start (a restarted work loop) gets its own event: stop() ends exactly the threads it started
        self._stop = stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(queue_name, stop), name="alive", daemon=True).start()
        threading.Thread(target=self._listen, args=(stop,), name="model-events", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.delete(self.settings.keys.alive(self.worker_name))
            self.redis.zrem(self.settings.keys.heartbeats, self.worker_name)
        except Exception:
            pass

    def _heartbeat(self, queue_name: str, stop: threading.Event) -> None:
        """Liveness for routing: a key that expires quickly when the process dies."""
        ttl = self.settings.alive_ttl_ms
        while True:
            try:
                info = {"queue": queue_name, "version": self.served.version if self.served else None,
                        "loading": self._loading, "jobs": self.jobs_done, "cache_hits": self.cache_hits,
                        "busy": self.busy, "rejected": sorted(self.rejected), "clicks": self.clicks,
                        "click_hits": self.click_hits, "refined": self.memory.refined}
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.settings.keys.alive(self.worker_name), json.dumps(info), px=ttl)
                    now_ms = int(time.time() * 1000)
                    pipe.zadd(self.settings.keys.heartbeats, {self.worker_name: now_ms})
                    pipe.zremrangebyscore(self.settings.keys.heartbeats, 0, now_ms - 3600_000)  # long-dead workers
                    pipe.execute()
            except Exception:
                pass
            if stop.wait(ttl / 3000):
                return

    def _listen(self, stop: threading.Event) -> None:
        """Pub/sub nudge from the registry; the per-job version check covers missed messages."""
        while not stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.settings.keys.version_channel)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        try:
                            version = json.loads(message["data"]).get("version")
                        except (ValueError, AttributeError):
                            version = None
                        self.check_version(version)
            except Exception:
                stop.wait(1.0)

    # --- jobs -------------------------------------------------------------------------------------

    def answer_order(self, jobs: list) -> list[list]:
        """The batch in the order its answers can go out: first the clicks whose image is embedded already (one
        decoder call each), then the jobs that need an image fetched and encoded. A click must not wait for a
        download and an encoder pass that only another job (a prewarm, a first click) needs."""
        predictor = self.served.predictor

        def ready(job) -> bool:
            payload = job.kwargs.get("payload") or {}
            key = (payload.get("job") or {}).get("image_key")
            return payload.get("kind") == "click" and isinstance(key, str) and predictor.is_cached(key)

        first, rest = [], []
        for job in jobs:
            (first if ready(job) else rest).append(job)
        return [part for part in (first, rest) if part]

    def run_batch(self, jobs: list) -> None:
        """Compute every job's result in one pass: one batched encoder call for the uncached images."""
        self.busy = len(jobs)
        try:
            self._run_batch(jobs)
        except Exception as error:  # a model failure fails these jobs, not the worker
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                self._results[job.id] = {"error": f"inference failed: {error}", "status": 500}
        finally:
            self.busy = 0

    def _run_batch(self, jobs: list) -> None:
        self.check_version()
        served = self.served
        predictor = served.predictor
        now = time.time()
        live, cached = [], {}
        for job in jobs:
            payload = job.kwargs.get("payload") or {}
            deadline = payload.get("deadline")
            if deadline is not None and now > deadline:
                # nobody waits for it any more: never spend model time on it
                self._results[job.id] = {"error": "expired before a worker took it", "status": 504}
                continue
            live.append((job, payload))
        from serving.jobs import run_job  # the backend's own executor: identical answers in and out of RQ

        urls: dict[str, str] = {}  # image key -> url of the uncached images
        for job, payload in live:
            data = payload.get("job") or {}
            key, url = data.get("image_key"), data.get("image_url")
            if not isinstance(key, str) or not isinstance(url, str) or key in cached:
                continue  # run_job reports bad jobs
            cached[key] = predictor.is_cached(key)
            if not cached[key]:
                urls[key] = url
        deadlines = [p["deadline"] for _, p in live if p.get("kind") == "click" and p.get("deadline")]
        wait_s = min([self.settings.fetch_wait_ms / 1000] + [d - time.time() - 0.5 for d in deadlines])
        ready = self.downloads.wait(list(urls.values()), wait_s)
        downloaded = [(key, ready[url]) for key, url in urls.items()
                      if url in ready and not isinstance(ready[url], Exception)]
        if downloaded:
            keys, images = zip(*downloaded)
            predictor.embed_many(list(images), list(keys))  # one batched encoder call for the whole batch
            self._remember_routes(list(keys))
        fetcher = BatchFetcher(self.fetcher, dict(ready))
        still_downloading = {url for url in urls.values() if url not in ready}
        for job, payload in live:
            data = payload.get("job") or {}
            if data.get("image_url") in still_downloading:
                self._results[job.id] = {"error": f"the image is still downloading from a slow server "
                                                  f"({data.get('image_url')}); click again in a moment",
                                         "status": 504}
                continue
            try:
                result = run_job(data, predictor, fetcher, served.version, self.memory)
            except Exception as error:  # a bug, not bad input: fail this job only
                log.exception("job %s failed", job.id)
                result = {"error": f"inference failed: {error.__class__.__name__}: {error}", "status": 500}
            hit = bool(cached.get(data.get("image_key")))
            self.jobs_done += 1
            self.cache_hits += int(hit)
            if payload.get("kind") == "click":
                self.clicks += 1
                self.click_hits += int(hit)
            if "error" not in result:
                result["cached"] = hit  # cached before this batch (run_job sees the batch's own embedding)
            result["worker"] = {"name": self.worker_name, "batch": len(jobs), "model_version": served.version}
            self._results[job.id] = result

    def _remember_routes(self, image_keys: list[str]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in image_keys:
                    pipe.set(self.settings.keys.image_route(key), self.worker_name, ex=self.settings.route_ttl_s)
                pipe.execute()
        except Exception:
            pass

    def publish_replies(self, jobs: list) -> None:
        """Push each waited-for result onto its reply list (``payload["reply_to"]``) right away.

        The backend BLPOPs these, so a click's answer does not wait for RQ's bookkeeping of the batch
        (about 20 Redis round trips per job). RQ then records a summary without the mask: its result
        stream would otherwise hold every click's RLE for ``result_ttl``.
        """
        replies = [(job.id, (job.kwargs.get("payload") or {}).get("reply_to")) for job in jobs]
        replies = [(job_id, key) for job_id, key in replies if isinstance(key, str) and job_id in self._results]
        if not replies:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, key in replies:
                    pipe.rpush(key, json.dumps(self._results[job_id]))
                    pipe.expire(key, self.settings.reply_ttl_s)
                pipe.execute()
        except Exception as error:  # the RQ result still carries the whole answer
            log.warning("could not publish %d replies: %s", len(replies), error)
            return
        for job_id, key in replies:
            result = self._results[job_id]
            objects = [{k: v for k, v in item.items() if k != "rle_base64"} for item in result.get("objects") or []]
            summary = dict(result, objects=objects) if "objects" in result else result
            self._results[job_id] = dict(summary, replied_to=key)

    def take_result(self, job_id: str) -> dict:
        result = self._results.pop(job_id, None)
        if result is None:
            raise RuntimeError(f"job {job_id} was not computed by this worker's batch")
        return result

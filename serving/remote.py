"""The backend's side of the RQ path: ``RQSegmenter`` (the backend's ``Segmenter`` protocol over Redis).

Each prediction becomes an RQ job (JSON serializer) carrying its deadline and a reply key; the worker
pushes the answer onto that list as soon as it is computed, before RQ's own bookkeeping, and the backend
waits on the lists with ``BLPOP`` (sub-second timeouts), so a click gets its answer or a clean error within
``deadline_ms``. Jobs carry an RQ ``ttl`` and the deadline in their payload, so a click nobody waits for
any more is dropped before it reaches the model.

Routing (embedding reuse across the fleet): ``route:<image key> -> worker`` (TTL, refreshed by the worker
that embeds the image). A prewarm or click for an image goes to its worker's own queue while that worker is
alive (heartbeat sorted set); an image without a live route is claimed for a live worker chosen by
rendezvous hashing (the same choice in every backend process), so the prewarm of a task and the clicks that
follow meet on one worker even before the embedding exists. The shared queue takes jobs without an image
key (and is drained by every worker). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from typing import TYPE_CHECKING

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from serving.registry import ModelRegistry
from serving.config import WorkerSettings, connect

if TYPE_CHECKING:  # the fetcher module imports PIL and requests; the backend imports it anyway
    from serving.images import ImageFetcher

log = logging.getLogger(__name__)

INFERENCE_JOB = "workers.tasks.collect_result"  # run by the inference workers, named, not imported


class SegmenterUnavailable(RuntimeError):
    """No answer within the deadline (no worker, worker died, Redis down); ``status`` for the HTTP answer."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def job_to_dict(job) -> dict:
    if isinstance(job, dict):
        return job
    if hasattr(job, "to_dict"):
        return job.to_dict()
    if dataclasses.is_dataclass(job):
        return dataclasses.asdict(job)
    raise TypeError(f"cannot serialise {type(job).__name__} as a segment job")


class RQSegmenter:
    """Segmenter protocol: ``segment(jobs)``, ``prewarm(jobs)``, ``health()``, ``model_version``."""

    def __init__(self, settings: WorkerSettings, fetcher: ImageFetcher) -> None:
        self.settings = settings
        redis_url = settings.redis_url
        keys = settings.keys
        # commands fail fast; waits use their own connection whose socket timeout exceeds any deadline
        self.redis = connect(redis_url, timeout_s=1.0)
        wait_s = max(self.settings.deadline_ms, self.settings.prewarm_deadline_ms) / 1000 + 5
        self.wait_redis = connect(redis_url, timeout_s=wait_s)
        self.shared = Queue(keys.shared_queue, connection=self.redis, serializer=JSONSerializer)
        self.registry = ModelRegistry(self.settings.model_dir, self.redis, keys)
        self.fetcher = fetcher
        self._version_cache: tuple[float, str] = (0.0, "unknown")
        self._lock = threading.Lock()
        self.stats = {"routed": 0, "shared": 0}

    # --- workers and routing ----------------------------------------------------------------------

    def alive_workers(self, redis=None) -> list[str]:
        cutoff = int(time.time() * 1000) - self.settings.alive_ttl_ms
        names = (redis or self.redis).zrangebyscore(self.settings.keys.heartbeats, cutoff, "+inf")
        return [n.decode() for n in names]

    def _queues_for(self, payloads: list[dict], bulk: bool = False) -> tuple[list[Queue], list[str]]:
        """Each job's queue: the worker holding (or claimed for) its image, the shared queue without a key;
        ``bulk`` work (prewarm) goes to the matching bulk queues, which workers take only when no click waits."""
        keys = [p["job"].get("image_key") for p in payloads]
        route_keys = [self.settings.keys.image_route(k) if isinstance(k, str) and k else None for k in keys]
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self.settings.keys.heartbeats, int(time.time() * 1000) - self.settings.alive_ttl_ms,
                               "+inf")
            for key in route_keys:
                pipe.get(key or "__none__")
            alive_raw, *routes = pipe.execute()
        alive = sorted(n.decode() for n in alive_raw)
        if not alive:
            raise SegmenterUnavailable("no inference worker is running (start `python -m workers.inference`)", 503)
        chosen, claims = [], {}
        for key, route_key, route in zip(keys, route_keys, routes):
            worker = route.decode() if route else None
            if route_key is None:
                chosen.append(None)
                continue
            if worker not in alive:
                # unclaimed image, or its worker died: every backend thread picks the same live worker
                # (rendezvous hashing), so the prewarm and the clicks of one image meet on one worker
                worker = claims.get(route_key) or max(alive, key=lambda w: hashlib.blake2b(
                    f"{key}|{w}".encode(), digest_size=8).digest())
                claims[route_key] = worker
            chosen.append(worker)
        if claims:
            with self.redis.pipeline(transaction=False) as pipe:
                for route_key, worker in claims.items():
                    pipe.set(route_key, worker, ex=self.settings.route_ttl_s)
                pipe.execute()
        keys = self.settings.keys
        queues = []
        for worker in chosen:
            self.stats["shared" if worker is None else "routed"] += 1
            if worker is None:
                name = keys.shared_bulk_queue if bulk else keys.shared_queue
            else:
                name = keys.worker_bulk_queue(worker) if bulk else keys.worker_queue(worker)
            queues.append(Queue(name, connection=self.redis, serializer=JSONSerializer))
        return queues, alive

    # --- jobs ------------------------------------------------------------------------------------

    def _submit(self, jobs, kind: str, deadline_ms: int, reply: bool) -> tuple[list[str], float]:
        """Enqueue one RQ job per segment job; with ``reply`` each names the list its answer goes to."""
        import redis

        deadline = time.monotonic() + deadline_ms / 1000
        wall_deadline = time.time() + deadline_ms / 1000
        ids = [f"{kind}-{uuid.uuid4().hex}" for _ in jobs]
        payloads = [{"job": job_to_dict(j), "kind": kind, "deadline": wall_deadline} for j in jobs]
        if reply:
            for job_id, payload in zip(ids, payloads):
                payload["reply_to"] = self.settings.keys.reply(job_id)
        ttl_s = max(1, math.ceil(deadline_ms / 1000))
        try:
            queues, _ = self._queues_for(payloads, bulk=kind != "click")
            with self.redis.pipeline() as pipe:
                for job_id, payload, queue in zip(ids, payloads, queues):
                    queue.enqueue(INFERENCE_JOB, kwargs={"payload": payload}, job_id=job_id, ttl=ttl_s,
                                  result_ttl=60, failure_ttl=300, job_timeout=ttl_s + 30,
                                  description=f"{kind} {payload['job'].get('image_url')}", pipeline=pipe)
                pipe.execute()
        except redis.RedisError as error:  # down, timing out, or refusing writes (OOM, READONLY)
            raise SegmenterUnavailable(f"Redis cannot take the job: {error.__class__.__name__}: {error}", 503) from None
        return ids, deadline

    def _wait(self, ids: list[str], deadline: float) -> dict[str, dict]:
        """The answers that arrive on the jobs' reply lists before ``deadline``."""
        import redis

        pending = {self.settings.keys.reply(job_id): job_id for job_id in ids}
        found: dict[str, dict] = {}
        try:
            while pending:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    break
                # BLPOP's timeout 0 means forever: never ask for less than a millisecond
                popped = self.wait_redis.blpop(list(pending), timeout=max(remaining_s, 0.001))
                if popped is None:
                    break
                key, body = popped
                job_id = pending.pop(key.decode())
                try:
                    found[job_id] = json.loads(body)
                except ValueError:
                    found[job_id] = {"error": "the inference worker sent an unreadable answer", "status": 500}
        except redis.RedisError as error:
            raise SegmenterUnavailable(f"Redis is unreachable: {error}", 503) from None
        return found

    def _cancel(self, ids: list[str]) -> None:
        """Forget jobs nobody waits for (those already started finish and their replies expire)."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.delete(Job.key_for(job_id), self.settings.keys.reply(job_id))
                pipe.execute()
        except Exception:
            pass

    def run(self, jobs, kind: str = "click", deadline_ms: int | None = None) -> list[dict]:
        """Results in order; a job the model rejected gives a dict with ``error`` and ``status``."""
        jobs = list(jobs)
        if not jobs:
            return []
        deadline_ms = deadline_ms or (self.settings.deadline_ms if kind == "click" else self.settings.prewarm_deadline_ms)
        ids, deadline = self._submit(jobs, kind, deadline_ms, reply=True)
        found = self._wait(ids, deadline)
        missing = [job_id for job_id in ids if job_id not in found]
        timeout_error = None
        if missing:
            self._cancel(missing)
            try:
                alive = self.alive_workers()
                who = f"{len(alive)} inference worker(s) alive" if alive else "no inference worker is alive"
            except Exception:  # noqa: BLE001 - Redis went away meanwhile
                who = "Redis unreachable"
            timeout_error = {"error": f"no answer from the inference workers within {deadline_ms} ms for "
                                      f"{len(missing)} of {len(ids)} job(s) ({who})", "status": 504}
        return [found[job_id] if job_id in found else dict(timeout_error) for job_id in ids]

    # Segmenter protocol

    def segment(self, jobs, bulk: bool = False) -> list[dict]:
        """One result per job; an outage gives every job ``{"error", "status"}`` within the deadline."""
        jobs = list(jobs)
        try:
            return self.run(jobs, "bulk" if bulk else "click")
        except SegmenterUnavailable as error:
            return [{"error": str(error), "status": error.status} for _ in jobs]

    def prewarm(self, jobs) -> None:
        """Embed the tasks' images on the fleet, through the same routing; does not wait."""
        warm = []
        for job in jobs:
            data = dict(job_to_dict(job))
            data.update(points=None, point_labels=None, box=None, prewarm_only=True)
            warm.append(data)
        if warm:
            try:
                self._submit(warm, "prewarm", self.settings.prewarm_deadline_ms, reply=False)
            except SegmenterUnavailable as error:
                log.warning("prewarm skipped: %s", error)

    @property
    def model_version(self) -> str:
        """The version the live workers serve (the registry's active one only when none is alive): after an
        activation the workers rejected, this stays the version that really answers clicks."""
        now = time.monotonic()
        stamp, version = self._version_cache
        if now - stamp < 1.0:
            return version
        try:
            served = [i.get("version") for i in self.worker_info() if i.get("version")]
            if served:
                active = self.registry.active()
                version = active if active in served else max(set(served), key=served.count)
            else:
                version = self.registry.active() or "unknown"
        except Exception:  # noqa: BLE001 - Redis down: keep the last answer
            pass
        self._version_cache = (now, version)
        return version

    def worker_info(self, redis=None) -> list[dict]:
        redis = redis or self.redis
        names = self.alive_workers(redis)
        if not names:
            return []
        raw = redis.mget([self.settings.keys.alive(n) for n in names])
        return [dict(json.loads(r), name=n) if r else {"name": n} for n, r in zip(names, raw)]

    def versions(self) -> list[str]:
        """Known versions, the one serving first (the backend's ``GET /versions``)."""
        described = self.registry.describe()
        names = [v["version"] for v in reversed(described["versions"])]
        serving = self.model_version
        return [serving] + [n for n in names if n != serving]

    def describe_versions(self) -> dict:
        """Versions with sha256, parent, metrics, created_at and which one is active."""
        return self.registry.describe()

    def queue_depth(self, redis) -> dict[str, int]:
        """Jobs waiting in every samlight inference queue: the shared ones and each worker's own."""
        prefix = "rq:queue:"
        keys = self.settings.keys
        names = sorted(n.decode()[len(prefix):] for n in redis.smembers("rq:queues"))
        names = [n for n in names if n.startswith((keys.shared_queue, keys.shared_bulk_queue))]
        with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(prefix + name)
            return dict(zip(names, pipe.execute()))

    def health(self) -> dict:
        """Redis and worker status; bounded by a short socket timeout, never blocks on inference.

        ``error`` (which makes ``/health`` answer 503, and Label Studio show the model as disconnected) when
        Redis is unreachable or no inference worker is alive: no click can be answered then.
        """
        probe = connect(self.settings.redis_url, timeout_s=0.5)
        try:
            probe.ping()
            workers = self.worker_info(probe)
            depth = self.queue_depth(probe)
            status = {"mode": "rq", "redis": "ok", "workers": workers, "queue_depth": depth,
                      "queued": sum(depth.values()), "fleet": "UP" if workers else "NO_WORKERS",
                      **self._training(probe)}
            if not workers:
                status["error"] = "no inference worker is alive (start `python -m workers.inference`)"
        except Exception as error:
            status = {"mode": "rq", "redis": f"unreachable: {error.__class__.__name__}", "workers": [],
                      "fleet": "REDIS_DOWN", "error": f"Redis is unreachable: {error}"}
        finally:
            probe.close()
        return status

    def _training(self, redis) -> dict:
        """The DLD job's state, and its last outcome (a refused candidate says why)."""
        try:
            job = Job.fetch(self.settings.keys.training_job_id, connection=redis, serializer=JSONSerializer)
        except Exception:  # noqa: BLE001 - no job yet, or an unreadable one: nothing to show
            return {}
        result = job.return_value() if job.get_status() == "finished" else None
        last = {k: v for k, v in (result or {}).items() if k in ("status", "version", "why", "reason")}
        if isinstance(result, dict) and (result.get("metrics") or {}).get("gate"):
            last.setdefault("why", result["metrics"]["gate"].get("why"))
        return {"training": {"job": job.get_status(), **({"last": last} if last else {})}}

    def close(self) -> None:
        for client in (self.redis, self.wait_redis):
            try:
                client.close()
            except Exception:
                pass


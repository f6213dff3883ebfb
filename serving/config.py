"""Configuration of the RQ side, read from the environment (one dataclass, no globals)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.env import flag


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass
class Keys:
    """Every Redis key and channel samlight owns (RQ's own keys live under ``rq:``)."""

    prefix: str = "samlight"

    @property
    def shared_queue(self) -> str:
        return f"{self.prefix}-infer"

    def worker_queue(self, worker: str) -> str:
        return f"{self.prefix}-infer.{worker}"

    # prewarm and batch work: a worker takes these only when no click waits in the queues above
    @property
    def shared_bulk_queue(self) -> str:
        return f"{self.prefix}-bulk"

    def worker_bulk_queue(self, worker: str) -> str:
        return f"{self.prefix}-bulk.{worker}"

    def inference_queues(self, worker: str) -> list[str]:
        """An inference worker's queues in the order it takes jobs from them: clicks first."""
        return [self.worker_queue(worker), self.shared_queue, self.worker_bulk_queue(worker), self.shared_bulk_queue]

    @property
    def training_queue(self) -> str:
        return f"{self.prefix}-training"

    def alive(self, worker: str) -> str:
        return f"{self.prefix}:infer:alive:{worker}"

    @property
    def heartbeats(self) -> str:  # sorted set worker -> last heartbeat (ms since epoch)
        return f"{self.prefix}:infer:heartbeats"

    def reply(self, job_id: str) -> str:  # list the worker pushes a click's result onto (the backend BLPOPs)
        return f"{self.prefix}:reply:{job_id}"

    def image_route(self, image_key: str) -> str:
        return f"{self.prefix}:route:{image_key}"

    @property
    def active_version(self) -> str:
        return f"{self.prefix}:model:active"

    @property
    def last_good_version(self) -> str:  # the last registry version a worker loaded and served
        return f"{self.prefix}:model:last-good"

    @property
    def version_channel(self) -> str:
        return f"{self.prefix}:model:events"

    def worker_model(self, worker: str) -> str:
        return f"{self.prefix}:infer:model:{worker}"

    @property
    def corrections(self) -> str:  # hash annotation id -> JSON correction
        return f"{self.prefix}:corrections"

    @property
    def correction_stream(self) -> str:  # append-only event stream (AOF-persisted)
        return f"{self.prefix}:corrections:stream"

    @property
    def corrections_since_training(self) -> str:
        return f"{self.prefix}:corrections:new"

    @property
    def training_requests(self) -> str:
        return f"{self.prefix}:training:requests"

    @property
    def cron_lock(self) -> str:
        return f"{self.prefix}:cron:lock"

    @property
    def training_job_id(self) -> str:
        return f"{self.prefix}-dld"


@dataclass
class WorkerSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_dir: Path = Path("models")
    keys: Keys = field(default_factory=Keys)
    deadline_ms: int = 5000  # a click's whole budget: queue wait + inference
    prewarm_deadline_ms: int = 60000
    max_batch: int = 8  # jobs a worker drains into one model call
    # how long a batch waits for its images; slower ones go on downloading in the background
    fetch_wait_ms: int = 2000
    cache_entries: int = 256  # embeddings a worker keeps (a 1024² image's is 4 MB)
    route_ttl_s: int = 600  # how long an image -> worker route is trusted
    reply_ttl_s: int = 60  # a click's reply list outlives a backend that stopped waiting this long
    alive_ttl_ms: int = 1500  # worker liveness key; heartbeat every third of it
    train_every_hours: float = 0.0  # 0 = no time-based schedule
    train_after_corrections: int = 0  # 0 = no count-based trigger
    gate_margin: float = 0.02  # candidate may be this much mIoU below the active version
    holdout_fraction: float = 0.2
    training_timeout_s: int = 6 * 3600
    # CPU workers: bf16 + torch.compile, or int8 linears + torch.compile (samlight.predictor.cpu_encoder_options);
    # a new model version compiles during its warm-up, before it is swapped in
    cpu_fast: bool = False
    cpu_int8: bool = False

    @classmethod
    def from_env(cls, **overrides) -> "WorkerSettings":
        settings = cls(
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            model_dir=Path(os.environ.get("MODEL_DIR", "models")),
            keys=Keys(os.environ.get("SAMLIGHT_REDIS_PREFIX", "samlight")),
            deadline_ms=_env_int("SAMLIGHT_DEADLINE_MS", cls.deadline_ms),
            prewarm_deadline_ms=_env_int("SAMLIGHT_PREWARM_DEADLINE_MS", cls.prewarm_deadline_ms),
            max_batch=_env_int("SAMLIGHT_MAX_BATCH", cls.max_batch),
            fetch_wait_ms=_env_int("SAMLIGHT_FETCH_WAIT_MS", cls.fetch_wait_ms),
            cache_entries=_env_int("SAMLIGHT_WORKER_CACHE_ENTRIES", cls.cache_entries),
            route_ttl_s=_env_int("SAMLIGHT_ROUTE_TTL_S", cls.route_ttl_s),
            alive_ttl_ms=_env_int("SAMLIGHT_ALIVE_TTL_MS", cls.alive_ttl_ms),
            train_every_hours=_env_float("SAMLIGHT_TRAIN_EVERY_HOURS", cls.train_every_hours),
            train_after_corrections=_env_int("SAMLIGHT_TRAIN_AFTER_CORRECTIONS", cls.train_after_corrections),
            gate_margin=_env_float("SAMLIGHT_GATE_MARGIN", cls.gate_margin),
            holdout_fraction=_env_float("SAMLIGHT_HOLDOUT_FRACTION", cls.holdout_fraction),
            training_timeout_s=_env_int("SAMLIGHT_TRAINING_TIMEOUT_S", cls.training_timeout_s),
            cpu_fast=flag(os.environ.get("SAMLIGHT_CPU_FAST"), False),
            cpu_int8=flag(os.environ.get("SAMLIGHT_CPU_INT8"), False),
        )
        for name, value in overrides.items():
            setattr(settings, name, value)
        return settings


def connect(redis_url: str, timeout_s: float = 2.0):
    """A Redis client that fails fast instead of hanging (backend threads must never block long)."""
    import redis

    return redis.Redis.from_url(
        redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30
    )

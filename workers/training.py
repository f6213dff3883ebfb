"""The DLD fine-tuning RQ job (``workers.training.run_training``), run by ``python -m workers.training_worker``.

The run itself is ``serving.training.train``; here its corrections come from Redis (``CorrectionStore``), the
registry publishes through Redis (workers reload at once), and refused runs are remembered in a Redis set.
"""

from __future__ import annotations

import dataclasses

from serving.config import Settings, connect
from serving.correction_stream import CorrectionStore
from serving.registry import ModelRegistry
from serving.training import train


class RedisRefused:
    def __init__(self, redis, key: str) -> None:
        self.redis, self.key = redis, key

    def __contains__(self, digest: str) -> bool:
        return bool(self.redis.sismember(self.key, digest))

    def add(self, digest: str) -> None:
        self.redis.sadd(self.key, digest)


def run_training(reason: str = "", requested_at: float | None = None, settings: dict | None = None) -> dict:
    """The RQ job body. Returns a JSON summary (published version, metrics, gate decision)."""
    from rq import get_current_job

    config = Settings.from_env()
    worker_settings, training = config.rq, dataclasses.replace(config.training, **(settings or {}))
    job = get_current_job()
    redis = job.connection if job is not None else connect(worker_settings.redis_url, timeout_s=10)
    keys = worker_settings.keys
    return train(config, training, CorrectionStore(redis, keys), ModelRegistry(worker_settings.model_dir, redis, keys),
                 RedisRefused(redis, f"{keys.prefix}:training:rejected"), reason)

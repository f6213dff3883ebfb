"""The HTTP server's own options, beside the shared ``serving.config.Settings`` (read with the same reader).

| variable | meaning |
|---|---|
| ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` | require HTTP basic auth on every endpoint |
| ``SAMLIGHT_WORKERS`` / ``SAMLIGHT_THREADS`` / ``PORT`` / ``SAMLIGHT_HOST`` | gunicorn processes, threads, bind |
| ``SAMLIGHT_PRELOAD`` | load the embedded model at worker start (default 1) |
| ``SAMLIGHT_TRAIN_SCHEDULE`` | embedded mode with ``SAMLIGHT_TEACHER``: train on corrections (default 1) |
| ``SAMLIGHT_AUTO_INLINE_S`` | a batch of automatic masks is answered inline this long, the rest in the background (20) |

Everything else (Label Studio, Redis, the model, limits) is in ``serving.config``; docs/configuration.md lists it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from serving.config import Environment, Settings


@dataclass
class BackendSettings:
    core: Settings = field(default_factory=Settings)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 32  # request threads mostly wait (on a worker's answer, an image, a model slot)
    preload: bool = True  # embedded: start loading the model when the worker starts
    max_request_bytes: int = 256 * 1024 * 1024  # webhook payloads carry whole annotations
    slot_wait_s: float = 5.0  # a /predict that finds every request slot taken waits this long, then 503
    auto_inline_s: float = 20.0  # well inside Label Studio's ML_TIMEOUT_PREDICT (100 s)
    train_schedule: bool = True  # embedded mode with SAMLIGHT_TEACHER: start training runs (serving.local_training)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "BackendSettings":
        read = Environment(env)
        return cls(
            core=Settings.from_env(env),
            basic_auth_user=read.text("BASIC_AUTH_USER"),
            basic_auth_pass=read.text("BASIC_AUTH_PASS"),
            host=read.text("SAMLIGHT_HOST", "0.0.0.0"),
            port=read.integer("PORT", 9090),
            workers=read.integer("SAMLIGHT_WORKERS", 1),
            threads=read.integer("SAMLIGHT_THREADS", 32),
            preload=read.flag("SAMLIGHT_PRELOAD", True),
            auto_inline_s=read.number("SAMLIGHT_AUTO_INLINE_S", 20.0),
            train_schedule=read.flag("SAMLIGHT_TRAIN_SCHEDULE", True),
        )

    def __post_init__(self) -> None:
        if self.basic_auth_user and not self.basic_auth_pass:
            raise ValueError("BASIC_AUTH_USER is set without BASIC_AUTH_PASS: set a password (an empty one would "
                             "let anyone in who knows the user name)")
        # several embedded processes share the cores instead of each running one torch thread per core
        embedded = self.core.embedded
        if embedded.torch_threads is None and self.workers > 1:
            embedded.torch_threads = max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def max_concurrent_predictions(self) -> int:
        # keep two request threads free so /health and /setup never wait behind inference
        return max(1, self.threads - 2)

"""The backend's configuration, read once from the environment (label-studio-ml 2.x names where they exist).

| variable | meaning |
|---|---|
| ``LABEL_STUDIO_URL`` | Label Studio's base URL, for relative ``/data/...`` image URLs |
| ``LABEL_STUDIO_API_KEY`` | personal access token or legacy token, sent only to that host |
| ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` | require HTTP basic auth on every endpoint |
| ``MODEL_DIR`` | state directory (webhook log in ``MODEL_DIR/corrections``), default ``./models`` |
| ``LOG_LEVEL`` | ``DEBUG``, ``INFO`` (default), ``WARNING`` ... |
| ``REDIS_URL`` | run inference on RQ workers instead of in process |
| ``SAMLIGHT_CHECKPOINT`` / ``SAMLIGHT_RANDOM`` / ``SAMLIGHT_SEED`` | the embedded model |
| ``SAMLIGHT_WORKERS`` / ``SAMLIGHT_THREADS`` / ``PORT`` / ``SAMLIGHT_HOST`` | gunicorn processes, threads, bind |
| ``SAMLIGHT_PRELOAD`` | load the embedded model at worker start (default 1) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.env import flag
from serving.images import FetchSettings
from serving.segmenter import SegmenterSettings


@dataclass
class BackendSettings:
    fetch: FetchSettings = field(default_factory=FetchSettings)
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    model_dir: Path = Path("models")
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 32  # request threads mostly wait (on a worker's answer, an image, a model slot)
    preload: bool = True  # embedded: start loading the model when the worker starts
    max_request_bytes: int = 256 * 1024 * 1024  # webhook payloads carry whole annotations
    slot_wait_s: float = 5.0  # a /predict that finds every request slot taken waits this long, then 503

    @classmethod
    def from_env(cls, env=None) -> "BackendSettings":
        env = os.environ if env is None else env
        return cls(
            fetch=FetchSettings.from_env(env),
            segmenter=SegmenterSettings.from_env(env),
            basic_auth_user=env.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=env.get("BASIC_AUTH_PASS") or None,
            model_dir=Path(env.get("MODEL_DIR") or "models"),
            log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
            host=env.get("SAMLIGHT_HOST") or "0.0.0.0",
            port=int(env.get("PORT") or 9090),
            workers=int(env.get("SAMLIGHT_WORKERS") or 1),
            threads=int(env.get("SAMLIGHT_THREADS") or 32),
            preload=flag(env.get("SAMLIGHT_PRELOAD"), True),
        )

    def __post_init__(self) -> None:
        if self.basic_auth_user and not self.basic_auth_pass:
            raise ValueError("BASIC_AUTH_USER is set without BASIC_AUTH_PASS: set a password (an empty one would "
                             "let anyone in who knows the user name)")
        # several embedded processes share the cores instead of each running one torch thread per core
        embedded = self.segmenter.embedded
        if embedded.torch_threads is None and self.workers > 1:
            embedded.torch_threads = max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def corrections_dir(self) -> Path:
        return self.model_dir / "corrections"

    @property
    def max_concurrent_predictions(self) -> int:
        # keep two request threads free so /health and /setup never wait behind inference
        return max(1, self.threads - 2)


"""Helpers for the RQ worker tests: worker processes (the servers are in testbed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_env(model_dir: Path, **extra) -> dict:
    env = dict(os.environ)
    # the test image servers run on loopback, which workers refuse to fetch from unless it is allowed
    env.update({"MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "SAMLIGHT_FETCH_ALLOW": "127.0.0.1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_inference_worker(redis_url: str, model_dir: Path, name: str, log_dir: Path, model: str = "lightening_test",
                           **env) -> subprocess.Popen:
    """A CPU inference worker serving random weights of ``model`` until the registry has an active version."""
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "workers.inference", "--gpu", "-1", "--random", model,
         "--redis-url", redis_url, "--name", name],
        cwd=REPO, env=worker_env(model_dir, **env), stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for_workers(segmenter, names: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(names) <= set(segmenter.alive_workers()):
            return
        time.sleep(0.2)
    raise AssertionError(f"workers {names} did not come up within {timeout}s (alive: {segmenter.alive_workers()})")


def stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

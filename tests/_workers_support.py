"""Helpers for the RQ worker tests: a module-scoped redis-server, an image server, worker processes."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ImageServer:
    """Serves a folder over HTTP on 127.0.0.1; ``/slow/<name>`` answers after ``slow_s`` seconds."""

    def __init__(self, folder: Path, slow_s: float = 4.0) -> None:
        folder = Path(folder)
        slow = slow_s

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.rsplit("/", 1)[-1].split("?")[0]
                if self.path.startswith("/slow/"):
                    time.sleep(slow)
                file = folder / name
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, slow: bool = False) -> str:
        return f"{self.base}/{'slow/' if slow else 'img/'}{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def worker_env(model_dir: Path, **extra) -> dict:
    env = dict(os.environ)
    # the test image servers run on loopback, which workers refuse to fetch from unless it is allowed
    env.update({"MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "SAMLIGHT_FETCH_ALLOW": "127.0.0.1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_inference_worker(redis_url: str, model_dir: Path, name: str, log_dir: Path, **env) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "workers.inference", "--gpu", "-1", "--random", "lightening_test",
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

"""Local servers the tests and the benchmarks start on 127.0.0.1: one copy of each.

A free port, a real ``redis-server``, an S3-compatible server (moto), and a file host that serves images the way Label Studio does
(``/data/upload/<name>`` behind its token check) or plainly (any other path). Not part of the product:
nothing under ``samlight/``, ``serving/``, ``backend/`` or ``workers/`` imports it.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Until something listens on ``port``; a clear error when ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f} s")


class RedisServer:
    """A real redis-server on 127.0.0.1. ``appendfsync="always"`` (the default) is how production runs it:
    the fault tests restart it and expect every acknowledged write back; None turns persistence off."""

    def __init__(self, directory: Path, port: int | None = None, binary: str | None = None,
                 appendfsync: str | None = "always") -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (`make redis` installs it)")
        self.appendfsync = appendfsync
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendfsync \
            else ["--appendonly", "no"]
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                *persistence, "--save", "", "--protected-mode", "no"]

    def start(self, env: dict | None = None) -> "RedisServer":
        self.process = subprocess.Popen(self.command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port, 15, "redis-server", self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class FileServer:
    """Serves the files of ``folder`` by name at any path. With ``token``, ``/data/upload/<name>`` needs
    Label Studio's ``Authorization: Token <token>`` (what the backend's fetcher must send); ``/slow/<name>``
    answers after ``slow_s`` seconds."""

    def __init__(self, folder: Path, token: str | None = None, slow_s: float = 4.0) -> None:
        folder = Path(folder)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                if token and self.path.startswith("/data/upload/") \
                        and self.headers.get("Authorization") != f"Token {token}":
                    self.send_error(401)
                    return
                if self.path.startswith("/slow/"):
                    time.sleep(slow_s)
                file = folder / self.path.rsplit("/", 1)[-1].split("?")[0]
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
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:  # what LABEL_STUDIO_URL is set to when this stands in for Label Studio
        return self.base

    def file_url(self, name: str, slow: bool = False) -> str:
        return f"{self.base}/{'slow' if slow else 'img'}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class S3Server:
    """An S3-compatible server on 127.0.0.1: moto's server mode (``moto[server]`` from PyPI), in a subprocess.

    Credentials are fixed test values; moto accepts any and signs presigned URLs the way S3 does."""

    ACCESS_KEY, SECRET_KEY, REGION = "samlight-test", "samlight-test-secret", "us-east-1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        import sys

        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 30, "moto server", self.process)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.ACCESS_KEY,
                            aws_secret_access_key=self.SECRET_KEY, region_name=self.REGION)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

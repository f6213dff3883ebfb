"""Shared fixtures: COCO data, seeded random models, a real redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter, so their tests still run (slowly) on CPU.
# Must be set before samlight (which defines the kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("SAMLIGHT_COCO_TINY", REPO.parent / "shared" / "data" / "coco_tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    if not (COCO_TINY / "val2017").is_dir():
        pytest.fail(f"COCO tiny data not found at {COCO_TINY} (set SAMLIGHT_COCO_TINY)")
    return COCO_TINY


@pytest.fixture(scope="session")
def coco_val_images(coco_tiny) -> list[Path]:
    return sorted((coco_tiny / "val2017").glob("*.jpg"))


@pytest.fixture(scope="session")
def test_student():
    """Seeded random reduced student (256 px input) for fast tests."""
    from samlight.modeling import build_student, seeded, student_config

    return seeded(0, build_student, student_config("lightening_test"))


@pytest.fixture(scope="session")
def test_teacher():
    """Seeded random reduced SAM teacher (256 px input)."""
    from samlight.models import ModelSpec

    return ModelSpec.random("vit_test").load()


class RedisServer:
    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (run `make test`, which installs it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server (AOF on) on a free port, stopped after the test."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()

"""Shared fixtures: COCO data, seeded random models, a real redis-server on a free port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from testbed import RedisServer

# Without a GPU, Triton kernels run in Triton's interpreter, so their tests still run (slowly) on CPU.
# Must be set before samlight (which defines the kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("SAMLIGHT_COCO_TINY", REPO.parent / "shared" / "data" / "coco_tiny"))


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


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server (AOF on) on a free port, stopped after the test."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()

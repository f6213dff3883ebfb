"""Official SAM checkpoints (teachers) and student checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from samlight.checkpoints import (
    CheckpointError,
    load_sam_checkpoint,
    load_student,
    save_student,
)
from samlight.modeling import student_config
from samlight.models import ModelSpec


@pytest.fixture(scope="module")
def official_vit_b(tmp_path_factory):
    """A seeded random SAM ViT-B saved the way the official files are: torch.save(state_dict)."""
    model = ModelSpec.random("vit_b", seed=3).load()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    with open(path, "wb") as f:
        torch.save(model.state_dict(), f)
    return model, path


@pytest.mark.slow
def test_official_checkpoint_loads_back(official_vit_b):
    model, path = official_vit_b
    loaded = load_sam_checkpoint(path)  # kind inferred from the patch embedding width
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert ModelSpec.parse(f"vit_b:{path}").load().image_encoder.img_size == 1024
    assert ModelSpec.parse(str(path)).version.startswith("sam-")


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: checkpoint file does not exist"):
        load_sam_checkpoint(tmp_path / "nope.pth")


def test_truncated_checkpoint_names_the_file_and_problem(official_vit_b, tmp_path):
    _, path = official_vit_b
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot be read .*truncated or corrupt"):
        load_sam_checkpoint(truncated)


@pytest.mark.slow
def test_mismatched_checkpoint_is_rejected(official_vit_b, tmp_path):
    model, _ = official_vit_b
    with pytest.raises(CheckpointError, match="does not match SAM vit_h"):
        path = tmp_path / "b.pth"
        torch.save(model.state_dict(), path)
        load_sam_checkpoint(path, kind="vit_h")
    state = dict(model.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load_sam_checkpoint(tmp_path / "partial.pth")
    torch.save({"not": "tensors"}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_sam_checkpoint(tmp_path / "junk.pth")


def test_model_spec_parsing():
    assert ModelSpec.parse("random:vit_b").identity == "random:vit_b:0"
    assert ModelSpec.parse("random:vit_test:7").seed == 7
    assert ModelSpec.parse("random:lightening_t:2").version == "random-lightening_t-2"
    assert ModelSpec.parse("vit_h:/x/sam.pth").config == "vit_h"
    assert ModelSpec.parse("/x/sam.pth").config is None
    with pytest.raises(ValueError, match="unknown model config 'vit_q'"):
        ModelSpec.parse("random:vit_q")
    with pytest.raises(ValueError, match="one of them"):
        ModelSpec.either("/x/sam.pth", "vit_b")


def test_student_round_trip_verifies_hash(test_student, tmp_path):
    config = student_config("lightening_test")
    digest = save_student(test_student, config, tmp_path / "student", metadata={"teacher": "random:vit_test:0"})
    manifest = json.loads((tmp_path / "student" / "config.json").read_text())
    assert manifest["sha256"] == digest and manifest["config"]["name"] == "lightening_test"
    loaded = load_student(tmp_path / "student")
    assert loaded.config == config and loaded.metadata["teacher"] == "random:vit_test:0"
    for a, b in zip(test_student.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    spec = ModelSpec.parse(str(tmp_path / "student"))
    assert spec.is_student and spec.version == f"lightening_test-{digest[:12]}"
    for a, b in zip(test_student.state_dict().values(), spec.load().state_dict().values()):
        assert torch.equal(a, b)


def test_student_save_is_atomic_and_replaces(test_student, tmp_path):
    config = student_config("lightening_test")
    target = tmp_path / "student"
    first = save_student(test_student, config, target)
    with torch.no_grad():
        test_student.image_encoder.pos_embed.add_(1.0)
    try:
        second = save_student(test_student, config, target)
    finally:
        with torch.no_grad():
            test_student.image_encoder.pos_embed.sub_(1.0)
    assert first != second and load_student(target).sha256 == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary leftovers


def test_corrupted_student_weights_are_rejected(test_student, tmp_path):
    save_student(test_student, student_config("lightening_test"), tmp_path / "s")
    weights = tmp_path / "s" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_student(tmp_path / "s")
    with pytest.raises(CheckpointError, match="not a student checkpoint"):
        load_student(tmp_path)

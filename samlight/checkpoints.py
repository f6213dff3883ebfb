"""Loading official SAM checkpoints (teachers) and saving/loading students.

A student checkpoint is a directory::

    model.safetensors   weights
    config.json         {"config": StudentConfig, "sha256": <of model.safetensors>, "metadata": {...}}

Saving is atomic (written to a temporary directory, then renamed); loading verifies the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from samlight.modeling import TEACHER_CONFIGS, StudentConfig, build_student, build_teacher, teacher_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match the model."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- official SAM checkpoints -------------------------------------------------------------------


def infer_sam_kind(state_dict: dict) -> str:
    """vit_b / vit_l / vit_h from the width of the patch embedding."""
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise CheckpointError("not a SAM state dict: no image_encoder.patch_embed.proj.weight")
    by_width = {cfg.embed_dim: name for name, cfg in TEACHER_CONFIGS.items()}
    try:
        return by_width[weight.shape[0]]
    except KeyError:
        raise CheckpointError(f"no known SAM variant has an image encoder {weight.shape[0]} wide") from None


def _read_state_dict(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected an official SAM .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?): {error}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return state


def load_sam_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Sam:
    """Build vanilla SAM (``vit_b``/``vit_l``/``vit_h``, inferred when ``kind`` is None) from an official file."""
    path = Path(path)
    state = _read_state_dict(path)
    kind = kind or infer_sam_kind(state)
    sam = build_teacher(teacher_config(kind))
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match SAM {kind}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    mismatched = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
                  if v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{path}: does not match SAM {kind}: tensor shapes differ: {mismatched[:3]}")
    sam.load_state_dict(state)
    return sam.eval()


# --- students -------------------------------------------------------------------------------------


@dataclass
class StudentCheckpoint:
    model: Sam
    config: StudentConfig
    sha256: str
    metadata: dict = field(default_factory=dict)
    path: Path | None = None


def save_student(model: Sam, config: StudentConfig, directory: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write ``model`` atomically to ``directory``; returns the sha256 of the weights."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / WEIGHTS_FILE)
        digest = sha256_file(staging / WEIGHTS_FILE)
        manifest = {"config": config.to_dict(), "sha256": digest, "metadata": metadata or {}}
        (staging / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for file in staging.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digest


def read_student_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not a student checkpoint (no {CONFIG_FILE})")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: invalid JSON: {error}") from None


def load_student(directory: str | os.PathLike, map_location: str = "cpu") -> StudentCheckpoint:
    """Load a student saved by :func:`save_student`, verifying the weights' sha256."""
    directory = Path(directory)
    manifest = read_student_manifest(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{weights}: weights file is missing")
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        raise CheckpointError(f"{weights}: sha256 {digest[:12]}… does not match config.json ({str(manifest.get('sha256'))[:12]}…)")
    try:
        config = StudentConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid student config: {error}") from None
    model = build_student(config)
    try:
        state = load_file(weights, device=map_location)
        model.load_state_dict(state, strict=True)
    except Exception as error:
        raise CheckpointError(f"{weights}: does not match config {config.name}: {error}") from None
    return StudentCheckpoint(model.eval(), config, digest, manifest.get("metadata", {}), directory)

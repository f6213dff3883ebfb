"""Which model a process serves when the registry has none: a checkpoint path, a named random config, or the
test-only geometry model. One description for the embedded backend and the inference workers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """Which model an embedded backend serves: a checkpoint path or a named random config."""

    checkpoint: str | None = None
    random: str | None = None
    seed: int = 0
    test_model: str | None = None  # "geometry": serving.testing's deterministic stand-in, for tests only

    def validate(self) -> None:
        if self.test_model is not None:
            from serving.testing import GEOMETRY

            if self.test_model != GEOMETRY:
                raise ValueError(f"SAMLIGHT_TEST_MODEL must be {GEOMETRY!r}, got {self.test_model!r}")
            return
        if (self.checkpoint is None) == (self.random is None):
            raise ValueError("set SAMLIGHT_CHECKPOINT (a student directory or SAM .pth) or SAMLIGHT_RANDOM "
                             "(a config name, random weights for demos) - exactly one of them")
        if self.checkpoint is not None:
            path = Path(self.checkpoint)
            if not path.exists():
                raise ValueError(f"checkpoint {path} does not exist")
            if path.is_dir() and not (path / "config.json").is_file():
                raise ValueError(f"checkpoint directory {path} has no config.json (not a samlight student)")
        if self.random is not None:
            from samlight.modeling.configs import STUDENT_CONFIGS, TEACHER_CONFIGS  # plain dataclasses, no torch

            if self.random not in STUDENT_CONFIGS and self.random not in TEACHER_CONFIGS:
                raise ValueError(f"unknown random config {self.random!r}; "
                                 f"choose from {sorted([*STUDENT_CONFIGS, *TEACHER_CONFIGS])}")

    def load(self):
        """``(model, version)`` of a checkpoint or random config (torch is imported here)."""
        from samlight.models import load_model

        return load_model(checkpoint=self.checkpoint, random=self.random, seed=self.seed)

    def version(self) -> str:
        """The version string ``samlight.models.load_model`` reports, computed without loading weights."""
        if self.test_model is not None:
            return f"test-{self.test_model}"
        if self.random is not None:
            return f"random-{self.random}-{self.seed}"
        path = Path(self.checkpoint)
        manifest = path / "config.json"
        if manifest.is_file():  # a student directory: its name and weights hash are in config.json
            data = json.loads(manifest.read_text())
            return f"{data['config']['name']}-{str(data['sha256'])[:12]}"
        from samlight.checkpoints import TeacherSpec  # hashes the file once; no weights are built

        return TeacherSpec.parse(str(path)).identity.replace(":sha256=", "-")

"""Which model a process serves when the registry has none: a checkpoint path, a named random config, or the
test-only geometry model. One description for the embedded backend and the inference workers."""

from __future__ import annotations

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
                raise ValueError(f"unknown model config {self.random!r}; "
                                 f"choose from {sorted([*STUDENT_CONFIGS, *TEACHER_CONFIGS])}")

    def spec(self):
        from samlight.models import ModelSpec  # imports torch

        return ModelSpec.either(self.checkpoint, self.random, self.seed)

    def load(self):
        """``(model, version)`` of a checkpoint or random config."""
        spec = self.spec()
        return spec.load(), spec.version

    def version(self) -> str:
        """The version ``load`` reports, computed without loading weights."""
        if self.test_model is not None:
            return f"test-{self.test_model}"
        if self.random is not None:  # ModelSpec's rule, without importing torch
            return f"random-{self.random}-{self.seed}"
        return self.spec().version

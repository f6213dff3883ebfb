"""Where a command or server gets its model: a checkpoint path or a named random config."""

from __future__ import annotations

import logging

from segment_anything.modeling import Sam

from samlight.checkpoints import load_any
from samlight.modeling import STUDENT_CONFIGS, build_student, seeded, student_config
from samlight.modeling.configs import TEACHER_CONFIGS, teacher_config
from samlight.modeling.build import build_teacher

log = logging.getLogger(__name__)


def random_model(name: str, seed: int = 0) -> Sam:
    """A seeded random-weight student (``lightening_t``) or SAM (``vit_b``): speed and plumbing only."""
    if name in TEACHER_CONFIGS:
        return seeded(seed, build_teacher, teacher_config(name))
    return seeded(seed, build_student, student_config(name))


def load_model(checkpoint: str | None = None, random: str | None = None, seed: int = 0) -> tuple[Sam, str]:
    """The model and its version string; exactly one of ``checkpoint`` and ``random``."""
    if (checkpoint is None) == (random is None):
        raise ValueError("give a checkpoint path or a random config name (one of them)")
    if random is not None:
        log.warning(
            "USING RANDOM WEIGHTS (%s, seed %d): masks are meaningless; for speed and plumbing tests only",
            random, seed,
        )
        return random_model(random, seed), f"random-{random}-{seed}"
    return load_any(checkpoint)


def model_names() -> list[str]:
    return [*STUDENT_CONFIGS, *TEACHER_CONFIGS]

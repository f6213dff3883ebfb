"""The one way every command, server and trainer gets a model: a :class:`ModelSpec`.

Like ``segment_anything.sam_model_registry``, a name picks a builder; unlike it, a spec also says where the
weights come from. Its text forms (``--teacher``, ``SAMLIGHT_TEACHER``, checkpoints on the command line):

    random:<config>[:seed]    seeded random weights of a student (``lightening_t``) or SAM (``vit_b``) config
    <directory>               a samlight student saved by ``samlight.checkpoints.save_student``
    vit_h:<file.pth>          an official SAM checkpoint of that variant
    <file.pth>                an official SAM checkpoint, variant inferred from its weights
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from segment_anything.modeling import Sam

from samlight.checkpoints import load_sam_checkpoint, load_student, read_student_manifest, sha256_file
from samlight.modeling import STUDENT_CONFIGS, TEACHER_CONFIGS, build_student, build_teacher, seeded
from samlight.modeling.configs import student_config, teacher_config

log = logging.getLogger(__name__)


def model_names() -> list[str]:
    """Every config a random model can be built from."""
    return [*STUDENT_CONFIGS, *TEACHER_CONFIGS]


@dataclass(frozen=True)
class ModelSpec:
    config: str | None  # a random model's config, or a SAM checkpoint's variant (None: inferred / a student)
    path: Path | None = None  # None: random weights
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        head, _, rest = text.partition(":")
        if head == "random":
            name, _, seed = rest.partition(":")
            return cls.random(name, int(seed or 0))
        if rest and head in TEACHER_CONFIGS:
            return cls(head, Path(rest))
        return cls(None, Path(text))

    @classmethod
    def random(cls, name: str, seed: int = 0) -> "ModelSpec":
        if name not in STUDENT_CONFIGS and name not in TEACHER_CONFIGS:
            raise ValueError(f"unknown model config {name!r}; choose from {sorted(model_names())}")
        return cls(name, None, seed)

    @classmethod
    def either(cls, checkpoint: str | None = None, random: str | None = None, seed: int = 0) -> "ModelSpec":
        """A command line's ``--checkpoint`` or ``--random`` (exactly one of them)."""
        if (checkpoint is None) == (random is None):
            raise ValueError("give a checkpoint path or a random config name (one of them)")
        return cls.random(random, seed) if random is not None else cls.parse(checkpoint)

    @property
    def is_random(self) -> bool:
        return self.path is None

    @property
    def is_student(self) -> bool:
        return self.path is not None and self.path.is_dir()

    def load(self) -> Sam:
        if self.path is None:
            log.warning("USING RANDOM WEIGHTS (%s, seed %d): masks are meaningless; for speed and plumbing "
                        "tests only", self.config, self.seed)
            if self.config in TEACHER_CONFIGS:
                return seeded(self.seed, build_teacher, teacher_config(self.config))
            return seeded(self.seed, build_student, student_config(self.config))
        if self.is_student:
            return load_student(self.path).model
        return load_sam_checkpoint(self.path, self.config)

    @property
    def identity(self) -> str:
        """A stable name of these weights (teacher feature caches and training metadata are keyed by it)."""
        if self.path is None:
            return f"random:{self.config}:{self.seed}"
        if self.is_student:
            return f"student:sha256={read_student_manifest(self.path)['sha256'][:16]}"
        return f"{self.config or 'sam'}:sha256={sha256_file(self.path)[:16]}"

    @property
    def version(self) -> str:
        """The model version a server reports for these weights, computed without loading them."""
        if self.path is None:
            return f"random-{self.config}-{self.seed}"
        if self.is_student:
            manifest = read_student_manifest(self.path)
            return f"{manifest['config']['name']}-{str(manifest['sha256'])[:12]}"
        return self.identity.replace(":sha256=", "-")

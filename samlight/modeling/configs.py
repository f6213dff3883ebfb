"""Configuration dataclasses and the named configs of students and teachers.

A student's config is stored as JSON next to its weights, so everything a model needs to be rebuilt
lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from samlight.modeling.dilated_attention import DilatedBranch


@dataclass(frozen=True)
class EncoderConfig:
    """The Lightening image encoder: a plain ViT whose attention is Dilated Flash Attention."""

    embed_dim: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    img_size: int = 1024
    patch_size: int = 16
    out_chans: int = 256
    # (segment length w, dilation r) per branch; branches with equal w/r share one kernel call
    branches: tuple[tuple[int, int], ...] = ((256, 1), (1024, 4), (4096, 16))
    token_order: str = "morton"
    # blocks that use dense global attention instead of dilated attention
    global_attn_indexes: tuple[int, ...] = ()
    attention_backend: str = "auto"

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def dilated_branches(self) -> tuple[DilatedBranch, ...]:
        return tuple(DilatedBranch(w, r) for w, r in self.branches)

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} outside 0..{self.depth - 1}")
        tokens = self.grid_size**2
        for branch in self.dilated_branches:
            branch.effective(tokens)


@dataclass(frozen=True)
class StudentConfig:
    """A SAM-Lightening student: Lightening encoder + SAM's prompt encoder and mask decoder."""

    name: str
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prompt_embed_dim: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudentConfig":
        encoder = dict(data.get("encoder", {}))
        unknown = set(encoder) - {f.name for f in dataclasses.fields(EncoderConfig)}
        if unknown:
            raise ValueError(f"unknown encoder config keys: {sorted(unknown)}")
        for key in ("branches", "global_attn_indexes"):
            if key in encoder:
                encoder[key] = tuple(tuple(x) if isinstance(x, list) else x for x in encoder[key])
        return cls(
            name=data["name"],
            encoder=EncoderConfig(**encoder),
            prompt_embed_dim=data.get("prompt_embed_dim", 256),
        )


@dataclass(frozen=True)
class TeacherConfig:
    """A vanilla SAM ViT (as in ``segment_anything.build_sam``), optionally at a smaller input."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    window_size: int = 14


STUDENT_CONFIGS: dict[str, StudentConfig] = {
    "lightening_t": StudentConfig("lightening_t", EncoderConfig()),
    "lightening_s": StudentConfig(
        "lightening_s",
        EncoderConfig(embed_dim=512, depth=8, num_heads=8, global_attn_indexes=(3, 7)),
    ),
    # reduced model for tests and quick demos: 256 px input, 16x16 grid
    "lightening_test": StudentConfig(
        "lightening_test",
        EncoderConfig(embed_dim=64, depth=2, num_heads=4, img_size=256, branches=((16, 1), (64, 4), (256, 16))),
    ),
}

TEACHER_CONFIGS: dict[str, TeacherConfig] = {
    "vit_h": TeacherConfig("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": TeacherConfig("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": TeacherConfig("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    # reduced teacher for tests: same architecture family at 256 px
    "vit_test": TeacherConfig("vit_test", 96, 4, 4, (1, 3), img_size=256, window_size=8),
}


def student_config(name: str) -> StudentConfig:
    try:
        return STUDENT_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown student config {name!r}; known: {', '.join(STUDENT_CONFIGS)}") from None


def teacher_config(name: str) -> TeacherConfig:
    try:
        return TEACHER_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown SAM teacher {name!r}; known: {', '.join(TEACHER_CONFIGS)}") from None

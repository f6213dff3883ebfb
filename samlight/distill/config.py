"""Settings of a distillation / fine-tuning run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class FineTuneConfig:
    """Both DLD stages. A step is one optimiser update of ``batch_size * grad_accum`` images per process."""

    out_dir: str = "runs/distill"
    encoder_steps: int = 1000
    decoder_steps: int = 500
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3  # encoder stage (student encoder + projections)
    decoder_lr: float = 1e-4  # decoder stage
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu
    autocast: bool | None = None  # bf16 autocast; default on for CUDA
    # teacher feature cache (None: run the teacher on every image, every time)
    cache_dir: str | None = None
    cache_max_gb: float = 50.0
    # encoder stage
    layer_sigma: float = 0.25  # width of the dynamic layer-weight bump (see samlight.distill.schedule)
    neck_weight: float = 1.0
    augment: float = 0.0  # share of images seen as a random view (flip, crop, colour; see samlight.distill.augment)
    # the masks the frozen decoder makes of the student's embedding against the teacher's, under random label-free
    # prompts (0: off): weighs the embedding's errors by what they do to masks
    output_weight: float = 0.0
    output_prompts: int = 8  # random prompts per image for that loss, half boxes, half single clicks
    # decoder stage
    teacher_loss_weight: float = 1.0
    gt_loss_weight: float = 1.0
    iou_loss_weight: float = 1.0
    focal_weight: float = 20.0
    instances_per_image: int = 8
    box_fraction: float = 0.5
    box_jitter: float = 0.1
    unfreeze_blocks: int = 0  # encoder blocks trained in the decoder stage, from the last one back (-1: all)
    # practicalities
    checkpoint_every: int = 50  # steps between atomic training-state checkpoints
    snapshot_every: int = 0  # encoder stage: also save the student every N steps (OUT/snapshots/), 0: never
    # teacher features kept on the training device (None: a tenth of a GPU's memory, none on the CPU)
    resident_features_gb: float | None = None
    num_workers: int = 0  # data loader threads (image decoding, cache reads); 0: in the training loop
    progress: bool = True
    max_images: int | None = None
    restart: bool = False  # start over in out_dir even if it holds a run with other settings

    # what a run's result does not depend on: these may change between an interruption and the resume
    PRACTICAL = ("out_dir", "device", "progress", "num_workers", "checkpoint_every", "cache_dir", "cache_max_gb",
                 "restart", "snapshot_every", "resident_features_gb")

    def validate(self) -> None:
        for name in ("encoder_steps", "decoder_steps", "instances_per_image", "num_workers", "snapshot_every",
                     "output_weight", "output_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_steps + self.decoder_steps == 0:
            raise ValueError("nothing to do: encoder_steps and decoder_steps are both 0")
        if not 0 <= self.augment <= 1:
            raise ValueError(f"augment must be in [0, 1], got {self.augment}")
        if not 0 <= self.box_fraction <= 1:
            raise ValueError(f"box_fraction must be in [0, 1], got {self.box_fraction}")
        if self.lr <= 0 or self.decoder_lr <= 0:
            raise ValueError("learning rates must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changes_from(self, saved: dict) -> list[str]:
        """``"name saved → now"`` for each setting that shapes the run and differs from a saved run's."""
        now = self.to_dict()
        return [f"{name} {saved[name]!r} → {now[name]!r}" for name in now
                if name not in self.PRACTICAL and name in saved and saved[name] != now[name]]

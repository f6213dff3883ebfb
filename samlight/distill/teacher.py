"""Teacher features for a batch of images: from the on-disk cache, or one teacher call for the misses."""

from __future__ import annotations

import contextlib
import logging

import torch
from segment_anything.modeling import Sam

from samlight.models import ModelSpec
from samlight.distill.feature_cache import TeacherFeatureCache

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_forward(teacher: Sam, x: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Neck output (B, 256, g, g) and the outputs (B, g, g, C) of the given 0-based blocks."""
    encoder = teacher.image_encoder
    h = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        h = h + encoder.pos_embed
    wanted = set(blocks)
    outputs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(encoder.blocks):
        h = block(h)
        if i in wanted:
            outputs[i] = h
    neck = encoder.neck(h.permute(0, 3, 1, 2))
    return neck, [outputs[i] for i in blocks]


class TeacherFeatures:
    """Teacher features per image: read from the cache, else one teacher encoder call for all misses
    (a run whose images are all cached never runs the teacher's encoder)."""

    def __init__(self, spec: ModelSpec, device: torch.device, cache: TeacherFeatureCache | None,
                 autocast: bool, teacher: Sam | None = None, identity: str | None = None) -> None:
        self.spec = spec
        # a checkpoint's identity hashes the whole file: computed once by the caller when it can
        self.identity = identity or (cache.teacher_identity if cache is not None else spec.identity)
        self.device = device
        self.cache = cache
        self.autocast = autocast
        self._teacher = teacher
        self.teacher_images = 0  # images the teacher encoder actually ran on

    @property
    def teacher(self) -> Sam:
        if self._teacher is None:
            log.info("loading teacher %s", self.identity)
            self._teacher = self.spec.load()
        self._teacher.to(self.device).eval()
        return self._teacher

    def cache_key(self, image_key: str, img_size: int, blocks: list[int]) -> str | None:
        return self.cache.key(image_key, img_size, blocks) if self.cache is not None else None

    def lookup(self, image_key: str, img_size: int, blocks: list[int]) -> dict[str, torch.Tensor] | None:
        if self.cache is None:
            return None
        return self.cache.get(self.cache.key(image_key, img_size, blocks))

    def _precision(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fetch(self, keys: list[str], x: torch.Tensor, img_size: int, blocks: list[int],
              found: list[dict[str, torch.Tensor] | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of a batch (normalised inputs ``x``); ``found`` are entries already read from the cache."""
        found = list(found) if found is not None else [self.lookup(k, img_size, blocks) for k in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            with self._precision():
                neck, outs = teacher_forward(self.teacher, x[missing], blocks)
            self.teacher_images += len(missing)
            for row, i in enumerate(missing):
                # rounded to fp16 whether cached or not, so cached and uncached runs train alike
                entry = {"neck": neck[row].half()}
                entry.update({f"block{b}": out[row].half() for b, out in zip(blocks, outs)})
                if self.cache is not None:
                    self.cache.put(self.cache.key(keys[i], img_size, blocks), entry)
                found[i] = entry
        # fp16 crosses to the device, the cast happens there
        neck = torch.stack([e["neck"].to(self.device).float() for e in found])
        feats = [torch.stack([e[f"block{b}"].to(self.device).float() for e in found]) for b in blocks]
        return neck, feats

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
    """Teacher features per image: kept on the device (up to ``resident_bytes``), else read from the disk
    cache, else one teacher encoder call for all misses. A run whose images all fit on the device reads
    each image's features once; one whose images are all cached never runs the teacher's encoder.

    An image key of ``None`` is an augmented view: its features are computed and used once.
    """

    def __init__(self, spec: ModelSpec, device: torch.device, cache: TeacherFeatureCache | None,
                 autocast: bool, teacher: Sam | None = None, identity: str | None = None,
                 resident_bytes: int = 0) -> None:
        self.spec = spec
        # a checkpoint's identity hashes the whole file: computed once by the caller when it can
        self.identity = identity or (cache.teacher_identity if cache is not None else spec.identity)
        self.device = device
        self.cache = cache
        self.autocast = autocast
        self._teacher = teacher
        self.teacher_images = 0  # images the teacher encoder actually ran on
        self.resident_bytes = resident_bytes
        self._resident: dict[str, dict[str, torch.Tensor]] = {}
        self._resident_used = 0

    @property
    def teacher(self) -> Sam:
        if self._teacher is None:
            log.info("loading teacher %s", self.identity)
            self._teacher = self.spec.load()
        self._teacher.to(self.device).eval()
        return self._teacher

    def cache_key(self, image_key: str, img_size: int, blocks: list[int]) -> str | None:
        return self.cache.key(image_key, img_size, blocks) if self.cache is not None else None

    def is_resident(self, image_key: str | None, blocks: list[int]) -> bool:
        """Whether the device holds these features (the data loader then skips the disk read)."""
        entry = self._resident.get(image_key) if image_key is not None else None
        return entry is not None and all(f"block{b}" in entry for b in blocks)

    def lookup(self, image_key: str | None, img_size: int, blocks: list[int]) -> dict[str, torch.Tensor] | None:
        if self.is_resident(image_key, blocks):
            return self._resident[image_key]
        if self.cache is None or image_key is None:
            return None
        return self.cache.get(self.cache.key(image_key, img_size, blocks))

    def _precision(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _keep(self, image_key: str | None, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move an entry to the device; keep it there while the budget lasts (first come: a run reads its
        images in a new order each epoch, so evicting would only trade one miss for another)."""
        entry = {name: t.to(self.device, non_blocking=True) for name, t in entry.items()}
        if image_key is None or image_key in self._resident:
            return entry
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self._resident_used + size <= self.resident_bytes:
            self._resident[image_key] = entry
            self._resident_used += size
        return entry

    def fetch(self, keys: list[str | None], x: torch.Tensor, img_size: int, blocks: list[int],
              found: list[dict[str, torch.Tensor] | None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of a batch (normalised inputs ``x``); ``found`` are entries already read from the cache."""
        if found is None:
            found = [self.lookup(key, img_size, blocks) for key in keys]
        else:  # the loader read the disk cache, except for what is resident
            found = [self._resident[key] if self.is_resident(key, blocks) else entry for key, entry in zip(keys, found)]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            with self._precision():
                neck, outs = teacher_forward(self.teacher, x[missing], blocks)
            self.teacher_images += len(missing)
            for row, i in enumerate(missing):
                # rounded to fp16 whether cached or not, so cached and uncached runs train alike
                entry = {"neck": neck[row].half()}
                entry.update({f"block{b}": out[row].half() for b, out in zip(blocks, outs)})
                if self.cache is not None and keys[i] is not None:
                    self.cache.put(self.cache.key(keys[i], img_size, blocks), entry)
                found[i] = entry
        found = [self._keep(key, entry) for key, entry in zip(keys, found)]
        neck = torch.stack([e["neck"] for e in found]).float()
        feats = [torch.stack([e[f"block{b}"] for e in found]).float() for b in blocks]
        return neck, feats

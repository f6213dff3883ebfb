"""SAM's image-encoder attention with its relative positions inside one fused attention call.

``segment_anything``'s ``Attention`` materialises every head's N × N scores (4096² per head in a global block),
adds the decomposed relative positions to them in broadcast kernels and runs a separate softmax: in a
distillation step on augmented views that was most of the GPU time (``bench/results/
distill-recipe-h200-20261203-run2-profile.txt``). The relative terms are a product too: query i's term for key
j is ``rel_h[i, row(j)] + rel_w[i, col(j)]``, so appending ``rel_h[i]`` and ``rel_w[i]`` to the (pre-scaled)
query and a one-hot of the key's row and column to the key gives the same scores, and
``scaled_dot_product_attention`` computes them without materialising anything. Same parameters, same state
dict, the same values up to rounding (``tests/test_model.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


class FusedRelPosAttention(Attention):
    """A drop-in ``Attention`` (the class of an existing module is swapped: see :func:`fuse_rel_pos_attention`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if self.use_rel_pos:
            rel_h, rel_w = self._relative_terms(q, height, width)
            rows, cols = self._key_positions(height, width, q)
            q = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
            k = torch.cat([k, rows.expand(batch, self.num_heads, -1, -1), cols.expand(batch, self.num_heads, -1, -1)],
                          dim=-1)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def _relative_terms(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's decomposed relative position terms of each query: (B, heads, N, height) and (B, heads, N, width)."""
        table_h = relative_table(height, self.rel_pos_h).to(q.dtype)
        table_w = relative_table(width, self.rel_pos_w).to(q.dtype)
        grid = q.reshape(*q.shape[:2], height, width, q.shape[-1])
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).flatten(2, 3)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).flatten(2, 3)
        return rel_h, rel_w

    @staticmethod
    def _key_positions(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot rows (N, height) and columns (N, width) of the keys, row-major."""
        index = torch.arange(height * width, device=like.device)
        rows = F.one_hot(index // width, height).to(like.dtype)
        cols = F.one_hot(index % width, width).to(like.dtype)
        return rows, cols


def relative_table(size: int, rel_pos: nn.Parameter) -> torch.Tensor:
    """``get_rel_pos(size, size, rel_pos)`` (size, size, d), with the index built on the table's device (SAM's
    builds it on the host: a host-to-device copy on every call, which no CUDA graph can capture)."""
    if rel_pos.shape[0] != 2 * size - 1:  # interpolated: SAM's own path
        return get_rel_pos(size, size, rel_pos)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def fuse_rel_pos_attention(encoder: nn.Module) -> int:
    """Make every SAM ``Attention`` of ``encoder`` a :class:`FusedRelPosAttention`, in place; returns how many."""
    count = 0
    for module in encoder.modules():
        if type(module) is Attention:
            module.__class__ = FusedRelPosAttention
            count += 1
    return count

"""A pre-norm transformer block over a token sequence."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn

from samlight.modeling.attention import SequenceAttention
from samlight.modeling.dilated_attention import DilatedBranch


class LighteningBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        branches: tuple[DilatedBranch, ...] | None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = SequenceAttention(dim, num_heads, branches, backend)
        self.norm2 = norm(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

"""Multi-head self-attention over a token sequence: dilated (default) or dense global."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samlight.modeling.dilated_attention import DilatedBranch, dilated_attention


class SequenceAttention(nn.Module):
    """qkv projection, attention over (B, N, C) tokens, output projection.

    ``branches=None`` means dense global attention (PyTorch's fused kernels).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        branches: tuple[DilatedBranch, ...] | None,
        backend: str = "auto",
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.branches = branches
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.branches is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = dilated_attention(q, k, v, self.branches, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

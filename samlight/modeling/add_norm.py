"""Residual add followed by LayerNorm, as one kernel in CUDA inference.

A pre-norm transformer adds each sublayer's output to the residual stream and normalises the sum for
the next sublayer: two kernels that both read the sum. At batch 1 the encoder is launch- and
latency-bound, so the Triton kernel here writes the sum and its LayerNorm in one pass. Elsewhere
(CPU, training) the eager ops run: the same function, rounded the same way (the sum is rounded to
the input dtype before it is normalised, as the eager ops do).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

Tensor = torch.Tensor


if triton is not None:

    @triton.jit
    def _add_layer_norm_kernel(X, Y, SUM, OUT, W, B, rows, cols, eps,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_N)
        col_ok = c < cols
        ok = (r < rows)[:, None] & col_ok[None, :]
        offsets = r[:, None] * cols + c[None, :]
        total = tl.load(X + offsets, mask=ok, other=0.0) + tl.load(Y + offsets, mask=ok, other=0.0)
        tl.store(SUM + offsets, total, mask=ok)
        s = total.to(tl.float32)
        mean = tl.sum(s, 1) / cols
        centred = tl.where(ok, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / cols + eps)
        w = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(B + c, mask=col_ok, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=ok)


def add_layer_norm_triton(x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """(x + y, norm(x + y)) with one Triton kernel; x and y contiguous, same shape and dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    cols = x.shape[-1]
    if x.shape != y.shape or x.dtype != y.dtype or not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError("add_layer_norm needs two contiguous tensors of one shape and dtype")
    if tuple(norm.normalized_shape) != (cols,):
        raise ValueError(f"LayerNorm over {tuple(norm.normalized_shape)} does not match the last axis {cols}")
    total, out = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // cols
    block_m = 4
    _add_layer_norm_kernel[(triton.cdiv(rows, block_m),)](
        x, y, total, out, norm.weight, norm.bias, rows, cols, norm.eps,
        BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(cols),
    )
    return total, out


def add_layer_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """(x + y, norm(x + y)): fused on CUDA without autograd, eager ops otherwise."""
    if (triton is not None and x.is_cuda and not torch.is_grad_enabled() and x.is_contiguous()
            and y.is_contiguous() and x.dtype == y.dtype and norm.weight.dtype == x.dtype):
        return add_layer_norm_triton(x, y, norm)
    total = x + y
    return total, norm(total)


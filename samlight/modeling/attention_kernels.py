"""Exact softmax attention kernels that also return the log-sum-exp (LSE) of each query row.

Dilated attention mixes its branches by their softmax denominators, so every kernel here returns
``(out, lse)`` and has a backward that accepts the *mixed* output in place of its own. With
``grad_out = w * dout`` and ``out = mixed`` the kernel's usual ``D = rowsum(grad_out * out)`` term
becomes exactly the gradient that also flows through the mixing weights (see
:mod:`samlight.modeling.dilated_attention`). All tensors are (batch, heads, length, head_dim);
``lse`` is (batch, heads, length) in float32.

Kernels:
- ``math``: explicit matmul + softmax, any device and dtype (the reference and the fallback).
- ``torch_cpu``: PyTorch's fused flash-attention kernel for CPU.
- ``torch_cuda``: PyTorch's fused CUDA kernels (flash for fp16/bf16, memory-efficient for fp32).
- ``flash_attn``: the ``flash_attn`` package (CUDA, fp16/bf16) when it is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates (and keeps its LSE) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionKernel(Protocol):
    name: str

    def supports(self, q: Tensor) -> bool: ...

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, object]:
        """(out, lse, aux): aux is whatever this kernel's backward needs from its forward."""
        ...

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, aux: object
    ) -> tuple[Tensor, Tensor, Tensor]: ...


class MathKernel:
    """Attention written out with matmuls; computes in float32 or better."""

    name = "math"

    def supports(self, q: Tensor) -> bool:
        return True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        dt = accumulation_dtype(q.dtype)
        scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.matmul(probs, v.to(dt))
        return out.to(q.dtype), lse, None

    def backward(self, dout, q, k, v, out, lse, scale, aux=None):
        dt = accumulation_dtype(q.dtype)
        q_, k_, v_, do_ = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
        probs = torch.exp(torch.matmul(q_, k_.transpose(-1, -2)) * scale - lse.to(dt).unsqueeze(-1))
        dv = torch.matmul(probs.transpose(-1, -2), do_)
        dp = torch.matmul(do_, v_.transpose(-1, -2))
        delta = (do_ * out.to(dt)).sum(-1, keepdim=True)
        ds = probs * (dp - delta) * scale
        dq = torch.matmul(ds, k_)
        dk = torch.matmul(ds.transpose(-1, -2), q_)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TorchCpuKernel:
    """PyTorch's fused CPU flash-attention (aten ``_scaled_dot_product_flash_attention_for_cpu``)."""

    name = "torch_cpu"

    def supports(self, q: Tensor) -> bool:
        return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def forward(self, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.to(accumulation_dtype(q.dtype)), None

    def backward(self, dout, q, k, v, out, lse, scale, aux=None):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse, 0.0, False, scale=scale
        )


class TorchCudaKernel:
    """PyTorch's fused CUDA kernels: flash attention for half types, memory-efficient otherwise."""

    name = "torch_cuda"

    def supports(self, q: Tensor) -> bool:
        return q.device.type == "cuda" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)

    @staticmethod
    def _use_flash(q: Tensor) -> bool:
        return q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0

    def forward(self, q, k, v, scale):
        length = q.shape[-2]
        if self._use_flash(q):
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False, scale=scale
            )
            return out, lse.float(), (cum_q, cum_k, max_q, max_k, seed, offset)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale
        )
        # the memory-efficient kernel pads lse to a multiple of 32 rows
        return out, lse[..., :length].float(), (seed, offset)

    def backward(self, dout, q, k, v, out, lse, scale, aux):
        dout, out = dout.contiguous(), out.contiguous()
        length = q.shape[-2]
        if self._use_flash(q):
            # the forward's own sequence-length and RNG outputs (undefined for fixed-length, no dropout)
            cum_q, cum_k, max_q, max_k, seed, offset = aux
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse.contiguous(), cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset,
                scale=scale,
            )
        else:
            seed, offset = aux
            padded = torch.full((*lse.shape[:-1], -(-length // 32) * 32), float("inf"), device=q.device)
            padded[..., :length] = lse
            grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                dout, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], False, scale=scale
            )
        return grads[0], grads[1], grads[2]


class FlashAttnKernel:
    """The ``flash_attn`` package (Dao-AILab). Forward only: training falls back to ``torch_cuda``."""

    name = "flash_attn"

    def supports(self, q: Tensor) -> bool:
        return (
            q.device.type == "cuda"
            and q.dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None
        )

    def forward(self, q, k, v, scale):
        from flash_attn import flash_attn_func

        # flash_attn wants (batch, length, heads, head_dim)
        out, lse, _ = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, return_attn_probs=True
        )
        return out.transpose(1, 2), lse.float(), None

    def backward(self, dout, q, k, v, out, lse, scale, aux=None):
        raise NotImplementedError("flash_attn kernel is used for inference only")


KERNELS: dict[str, AttentionKernel] = {
    kernel.name: kernel for kernel in (MathKernel(), TorchCpuKernel(), TorchCudaKernel(), FlashAttnKernel())
}
BACKENDS = ("auto", "reference", "triton", *KERNELS)


def select_kernel(backend: str, q: Tensor, needs_grad: bool) -> AttentionKernel:
    """The kernel for ``backend`` ('auto' picks the fastest one that supports ``q``)."""
    if backend == "auto":
        order = ("torch_cuda", "math") if needs_grad else ("flash_attn", "torch_cuda", "math")
        if q.device.type == "cpu":
            order = ("torch_cpu", "math")
        for name in order:
            if KERNELS[name].supports(q):
                return KERNELS[name]
    if backend not in KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    kernel = KERNELS[backend]
    if not kernel.supports(q):
        raise ValueError(f"attention backend {backend!r} does not support {q.dtype} tensors on {q.device}")
    if needs_grad and kernel.name == "flash_attn":
        raise ValueError("attention backend 'flash_attn' is inference-only; use 'torch_cuda' for training")
    return kernel

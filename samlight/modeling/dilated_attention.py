"""Dilated Flash Attention (LongNet-style), the attention of the SAM-Lightening encoder.

For a branch ``(w, r)`` the sequence of N tokens is cut into N/w segments of length w; head h keeps
the tokens at offsets ``h mod r, h mod r + r, ...`` of each segment (so different heads cover
different positions) and runs exact softmax attention inside each sparse segment of L = w/r tokens.
Branch outputs are mixed per query by their softmax denominators::

    out_i = sum_b exp(lse_b,i - lse_i) * out_b,i      lse_i = logsumexp_b lse_b,i

which is the same as one softmax over the union of every branch's keys for that query. A
(head, position) that no branch covers gets zeros.

Fast path: branches with equal L are gathered into one batch and run through one fused kernel
call that also returns the LSE (:mod:`attention_kernels`); the backward reuses the kernels'
backward with the *mixed* output, which makes the gradient through the mixing weights exact.
:func:`reference_dilated_attention` is the dense formulation the fast path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from samlight.modeling import triton_dilated
from samlight.modeling.attention_kernels import AttentionKernel, accumulation_dtype, select_kernel

Tensor = torch.Tensor


@dataclass(frozen=True)
class DilatedBranch:
    """One (segment length w, dilation r) branch."""

    segment: int
    dilation: int

    def effective(self, length: int) -> "DilatedBranch":
        """The branch as it applies to a sequence of ``length`` tokens (w is capped at N)."""
        segment = min(self.segment, length)
        if self.dilation < 1 or segment < 1 or segment % self.dilation or length % segment:
            raise ValueError(
                f"dilated branch (w={self.segment}, r={self.dilation}) does not tile {length} tokens: "
                f"need N % w == 0 and w % r == 0"
            )
        return DilatedBranch(segment, self.dilation)

    @property
    def sparse_length(self) -> int:
        return self.segment // self.dilation


def _head_offsets(heads: int, dilation: int, device: torch.device) -> tuple[Tensor, Tensor]:
    head_index = torch.arange(heads, device=device)
    return head_index, head_index % dilation


def _positions_view(x: Tensor, branch: DilatedBranch) -> Tensor:
    b, h, n = x.shape[:3]
    return x.view(b, h, n // branch.segment, branch.sparse_length, branch.dilation, *x.shape[3:])


def _select(x: Tensor, branch: DilatedBranch) -> Tensor:
    """Values of x (B, H, N, ...) at the branch's positions as (B*H*S, 1, L, ...) sparse segments.

    With dilation 1 this is a view (no copy); otherwise head h keeps offset h mod r of each run of r.
    """
    b, h, n = x.shape[:3]
    shape = (b * h * (n // branch.segment), 1, branch.sparse_length, *x.shape[3:])
    if branch.dilation == 1:
        return x.reshape(shape)
    heads, offsets = _head_offsets(h, branch.dilation, x.device)
    # advanced indices on dims 1 and 4 move to the front: (H, B, S, L, ...)
    picked = _positions_view(x, branch)[:, heads, :, :, offsets]
    return picked.transpose(0, 1).reshape(shape)


def _assign(x: Tensor, branch: DilatedBranch, values: Tensor, accumulate: bool = False) -> None:
    """Inverse of :func:`_select`: write (or add) ``values`` at the branch's positions of x."""
    b, h, n = x.shape[:3]
    if branch.dilation == 1:
        target = x.view(values.shape)
        target.add_(values) if accumulate else target.copy_(values)
        return
    heads, offsets = _head_offsets(h, branch.dilation, x.device)
    shaped = values.reshape(b, h, n // branch.segment, branch.sparse_length, *x.shape[3:]).transpose(0, 1)
    view = _positions_view(x, branch)
    if accumulate:
        view[:, heads, :, :, offsets] += shaped
    else:
        view[:, heads, :, :, offsets] = shaped


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _groups(branches: tuple[DilatedBranch, ...], device: torch.device) -> list[list[DilatedBranch]]:
    """Branches batched into kernel calls: on CUDA, equal sparse lengths share one launch.

    On CPU one call per branch: batching buys nothing there and concatenating costs a copy.
    """
    if device.type != "cuda":
        return [[branch] for branch in branches]
    by_length: dict[int, list[DilatedBranch]] = {}
    for branch in branches:
        by_length.setdefault(branch.sparse_length, []).append(branch)
    return list(by_length.values())


def _run_group(kernel: AttentionKernel, group, q, k, v, scale):
    sizes = [q.shape[0] * q.shape[1] * (q.shape[2] // br.segment) for br in group]
    qs, ks, vs = (_cat([_select(t, br) for br in group]) for t in (q, k, v))
    out, lse, aux = kernel.forward(qs, ks, vs, scale)
    return [(branch, o, l) for branch, o, l in zip(group, out.split(sizes), lse.split(sizes))], aux


def _forward(q, k, v, branches, kernel, scale, out=None):
    """Mixed output (float32, written into ``out`` when given), total LSE, and each branch's LSE."""
    b, h, n, d = q.shape
    dtype = accumulation_dtype(q.dtype)
    acc = torch.empty(b, h, n, d, dtype=dtype, device=q.device) if out is None else out
    lse_total = torch.full((b, h, n), float("-inf"), dtype=dtype, device=q.device)
    branch_lse, aux = [], []
    written = False
    groups = _groups(branches, q.device)
    # a dense first branch writes every position: no later branch meets an unwritten one, none stays empty
    covered = groups[0][0].dilation == 1
    for group in groups:
        results, group_aux = _run_group(kernel, group, q, k, v, scale)
        aux.append(group_aux)
        for branch, o_b, lse_b in results:
            if not written:  # the first branch is written as it is: nothing to mix with yet
                _assign(acc, branch, o_b.to(dtype))
                _assign(lse_total, branch, lse_b)
                branch_lse.append(lse_b.squeeze(1))
                written = True
                continue
            lse_b = lse_b.squeeze(1)
            old = _select(lse_total, branch).squeeze(1)
            new = torch.logaddexp(old, lse_b)
            previous = _select(acc, branch).squeeze(1) * torch.exp(old - new).unsqueeze(-1)
            if not covered:  # a position no earlier branch wrote holds garbage: take the new branch alone there
                previous = torch.where(torch.isfinite(old).unsqueeze(-1), previous, 0.0)
            _assign(acc, branch, previous + o_b.squeeze(1).to(dtype) * torch.exp(lse_b - new).unsqueeze(-1))
            _assign(lse_total, branch, new)
            branch_lse.append(lse_b)
    if not covered:
        acc.masked_fill_(torch.isinf(lse_total).unsqueeze(-1), 0.0)
    return acc, lse_total, branch_lse, aux


class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, branches, kernel, scale):
        out, lse_total, branch_lse, aux = _forward(q, k, v, branches, kernel, scale)
        out = out.to(q.dtype)
        ctx.branches, ctx.kernel, ctx.scale, ctx.aux = branches, kernel, scale, aux
        ctx.save_for_backward(q, k, v, out, lse_total, *branch_lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse_total, *branch_lse = ctx.saved_tensors
        lse_of = dict(zip(ctx.branches, branch_lse))
        dq, dk, dv = (torch.zeros_like(t, dtype=lse_total.dtype) for t in (q, k, v))
        for group, aux in zip(_groups(ctx.branches, q.device), ctx.aux):
            sizes = [q.shape[0] * q.shape[1] * (q.shape[2] // br.segment) for br in group]
            lse_b = _cat([lse_of[br].unsqueeze(1) for br in group])
            weight = torch.exp(lse_b - _cat([_select(lse_total, br) for br in group]))
            grad_out = (_cat([_select(dout, br) for br in group]) * weight.unsqueeze(-1)).to(q.dtype)
            mixed_out = _cat([_select(out, br) for br in group])
            gathered = [_cat([_select(t, br) for br in group]) for t in (q, k, v)]
            grads = ctx.kernel.backward(grad_out, *gathered, mixed_out, lse_b.contiguous(), ctx.scale, aux)
            for target, grad in zip((dq, dk, dv), grads):
                for branch, part in zip(group, grad.split(sizes)):
                    _assign(target, branch, part.to(target.dtype), accumulate=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    branches: tuple[DilatedBranch, ...],
    backend: str = "auto",
    scale: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Multi-branch dilated attention over (B, heads, N, head_dim) tensors in sequence order.

    ``backend``: 'auto', 'reference', 'triton' (fused, inference), or a kernel name from
    :data:`attention_kernels.KERNELS`.
    ``out``: optional float32 buffer to write into (inference only).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be equal (B, heads, N, head_dim) tensors, got {q.shape}, {k.shape}, {v.shape}")
    n = q.shape[2]
    branches = tuple(branch.effective(n) for branch in branches)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "reference":
        return reference_dilated_attention(q, k, v, branches, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if use_triton(backend, q, needs_grad) and out is None:
        return triton_dilated.dilated_attention_triton(q, k, v, branches, scale)
    kernel = select_kernel(backend, q, needs_grad)
    if out is not None:
        if needs_grad or out.dtype != torch.float32 or out.shape != q.shape:
            raise ValueError("dilated_attention(out=...) takes a float32 buffer shaped like q, for inference only")
        return _forward(q, k, v, branches, kernel, scale, out=out)[0]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _DilatedAttentionFunction.apply(q, k, v, branches, kernel, scale)


def use_triton(backend: str, q: Tensor, needs_grad: bool) -> bool:
    """The fused Triton path: asked for by name, or chosen by 'auto' for CUDA inference."""
    if backend == "triton":
        if needs_grad:
            raise ValueError("attention backend 'triton' is inference-only; use 'torch_cuda' for training")
        if not triton_dilated.available():
            raise ValueError("attention backend 'triton' needs the triton package")
        return True
    head_dim = q.shape[-1]
    return (
        backend == "auto" and not needs_grad and q.device.type == "cuda" and triton_dilated.available()
        and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    )


def coverage_counts(n: int, heads: int, branches: tuple[DilatedBranch, ...], device=None) -> Tensor:
    """C[h, i, j]: in how many branches query i and key j share a sparse segment of head h."""
    counts = torch.zeros(heads, n, n, device=device)
    positions = torch.arange(n, device=device)
    for branch in (b.effective(n) for b in branches):
        segment_of = positions // branch.segment
        for head in range(heads):
            kept = (positions % branch.dilation) == (head % branch.dilation)
            same = (segment_of[:, None] == segment_of[None, :]) & kept[:, None] & kept[None, :]
            counts[head] += same
    return counts


def reference_dilated_attention(q: Tensor, k: Tensor, v: Tensor, branches, scale: float | None = None) -> Tensor:
    """Dense reference: softmax(q k^T * scale + log C) v, with C from :func:`coverage_counts`.

    Independent of the gather/scatter machinery of the fast path; O(N^2) memory, for tests.
    """
    n, heads = q.shape[2], q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = accumulation_dtype(q.dtype)
    counts = coverage_counts(n, heads, tuple(branches), device=q.device).to(dt)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale + torch.log(counts)
    covered = torch.isfinite(scores).any(-1, keepdim=True)
    probs = torch.softmax(torch.where(covered, scores, torch.zeros_like(scores)), dim=-1) * covered
    return torch.matmul(probs, v.to(dt)).to(q.dtype)

"""Fused Dilated Flash Attention for inference, in Triton.

The PyTorch path gathers every branch's sparse segments into new tensors, runs a kernel, and
scatters and mixes the results with a dozen small ops. Here each branch is one kernel launch that
reads q, k and v *in place* (strided loads at ``segment_start + h mod r + j * r``, straight from the
qkv projection's layout) and writes its output and LSE at the query positions; one more kernel mixes
the branches by log-sum-exp, computing which branches cover a (position, head) from the indices
alone, and writes (B, N, heads, head_dim), the layout the output projection reads. No gather, no
scatter, no initialisation pass.

Inference only (no backward). Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` for tests.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

Tensor = torch.Tensor


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _branch_kernel(
        Q, K, V, O, LSE, TABLE,
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
        o_branch_stride, sob, son, soh, lse_branch_stride, slb, slh,
        heads, qk_scale,
        BRANCHES: tl.constexpr, SPARSE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # program (query block of one sparse segment of one branch, batch*head); the branches of one
        # launch share their sparse length, and TABLE rows are (first program, segment, dilation, branch)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        first_program = tl.load(TABLE)
        segment_length = tl.load(TABLE + 1)
        dilation = tl.load(TABLE + 2)
        branch = tl.load(TABLE + 3)
        for i in tl.static_range(1, BRANCHES):
            later = pid_m >= tl.load(TABLE + 4 * i)
            first_program = tl.where(later, tl.load(TABLE + 4 * i), first_program)
            segment_length = tl.where(later, tl.load(TABLE + 4 * i + 1), segment_length)
            dilation = tl.where(later, tl.load(TABLE + 4 * i + 2), dilation)
            branch = tl.where(later, tl.load(TABLE + 4 * i + 3), branch)
        O += branch * o_branch_stride
        LSE += branch * lse_branch_stride
        local = pid_m - first_program
        blocks_per_segment = tl.cdiv(SPARSE, BLOCK_M)
        segment = local // blocks_per_segment
        first = (local % blocks_per_segment) * BLOCK_M
        base = segment * segment_length + h % dilation

        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < SPARSE
        q_pos = base + rows * dilation
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + q_pos[:, None] * sqn + dims[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, SPARSE, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < SPARSE
            k_pos = base + cols * dilation
            k = tl.load(K + b * skb + h * skh + k_pos[:, None] * skn + dims[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + k_pos[:, None] * svn + dims[None, :], mask=col_ok[:, None], other=0.0)
            # scores in base 2: qk_scale already holds log2(e)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(O + b * sob + q_pos[:, None] * son + h * soh + dims[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        # natural-log LSE, like the other kernels
        tl.store(LSE + b * slb + h * slh + q_pos, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)

    @triton.jit
    def _mix_kernel(
        O, LSE, OUT, DIL,
        o_branch_stride, lse_branch_stride,
        sob, son, soh, slb, slh, sxb, sxn, sxh,
        heads, seq_len, rows_total,
        BRANCHES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # one row = (batch, position, head)
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = row < rows_total
        h = row % heads
        n = (row // heads) % seq_len
        b = row // (heads * seq_len)
        dims = tl.arange(0, HEAD_DIM)

        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for i in tl.static_range(BRANCHES):
            r = tl.load(DIL + i)
            covered = ok & ((n % r) == (h % r))
            lse = tl.load(LSE + i * lse_branch_stride + b * slb + h * slh + n, mask=covered, other=float("-inf"))
            top = tl.maximum(top, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        denominator = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        for i in tl.static_range(BRANCHES):
            r = tl.load(DIL + i)
            covered = ok & ((n % r) == (h % r))
            lse = tl.load(LSE + i * lse_branch_stride + b * slb + h * slh + n, mask=covered, other=0.0)
            weight = tl.where(covered, tl.exp(lse - top), 0.0)
            o = tl.load(O + i * o_branch_stride + b[:, None] * sob + n[:, None] * son + h[:, None] * soh + dims[None, :],
                        mask=covered[:, None], other=0.0)
            denominator += weight
            acc += o.to(tl.float32) * weight[:, None]
        # a (position, head) no branch covers gets zeros, like the PyTorch path
        acc = acc / tl.where(denominator > 0, denominator, 1.0)[:, None]
        tl.store(OUT + b[:, None] * sxb + n[:, None] * sxn + h[:, None] * sxh + dims[None, :],
                 acc.to(OUT.dtype.element_ty), mask=ok[:, None])


def dilated_attention_triton(q: Tensor, k: Tensor, v: Tensor, branches, scale: float) -> Tensor:
    """Same function as the PyTorch path, forward only; q, k, v may be strided views (B, H, N, D).

    ``branches`` are already capped to N (``DilatedBranch.effective``). Returns a (B, H, N, D) view of
    a contiguous (B, N, H, D) tensor.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, h, n, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"the triton backend needs a power-of-two head_dim >= 16, got {d}")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("the triton backend needs unit stride in head_dim")
    count = len(branches)
    o_all = torch.empty(count, b, n, h, d, device=q.device, dtype=q.dtype)
    lse_all = torch.empty(count, b, h, n, device=q.device, dtype=torch.float32)
    out = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype)
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernel uses exp2
    # one launch per distinct sparse length (lightening_t's three branches are all 256 long: one launch);
    # small branches alone would leave most SMs idle
    for sparse, programs, table in _launches(tuple((br.segment, br.dilation, br.sparse_length) for br in branches),
                                             n, str(q.device)):
        block = _block_size(sparse)
        _branch_kernel[(programs, b * h)](
            q, k, v, o_all, lse_all, table,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o_all.stride(0), o_all.stride(1), o_all.stride(2), o_all.stride(3),
            lse_all.stride(0), lse_all.stride(1), lse_all.stride(2),
            h, qk_scale,
            BRANCHES=table.shape[0], SPARSE=sparse, HEAD_DIM=d, BLOCK_M=block, BLOCK_N=block,
            # float32 inputs get true float32 products, not TF32 (half types are exact either way)
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
    dilations = _dilations_on(tuple(br.dilation for br in branches), str(q.device))
    rows = b * n * h
    block = 32
    _mix_kernel[(triton.cdiv(rows, block),)](
        o_all, lse_all, out, dilations,
        o_all.stride(0), lse_all.stride(0),
        o_all.stride(1), o_all.stride(2), o_all.stride(3), lse_all.stride(1), lse_all.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, n, rows,
        BRANCHES=count, HEAD_DIM=d, BLOCK=block,
    )
    return out.transpose(1, 2)


def _block_size(sparse: int) -> int:
    # tl.dot needs every dimension >= 16; shorter segments are masked
    return max(16, min(64, triton.next_power_of_2(sparse)))


@functools.lru_cache(maxsize=64)
def _launches(branches: tuple[tuple[int, int, int], ...], seq_len: int, device: str) -> list[tuple[int, int, Tensor]]:
    """(sparse length, programs per batch*head, device table of (first program, segment, dilation, branch))
    for each group of branches with one sparse length."""
    launches = []
    for sparse in dict.fromkeys(s for _, _, s in branches):
        block = _block_size(sparse)
        rows, programs = [], 0
        for index, (segment, dilation, length) in enumerate(branches):
            if length == sparse:
                rows.append((programs, segment, dilation, index))
                programs += (seq_len // segment) * triton.cdiv(sparse, block)
        with torch.inference_mode(False):  # made once: no host-to-device copy on the hot path or in a graph
            launches.append((sparse, programs, torch.tensor(rows, device=device, dtype=torch.int32)))
    return launches


@functools.lru_cache(maxsize=16)
def _dilations_on(dilations: tuple[int, ...], device: str) -> Tensor:
    # made once per device: no host-to-device copy on the hot path (and none inside a CUDA graph)
    with torch.inference_mode(False):
        return torch.tensor(dilations, device=device, dtype=torch.int32)

"""Dilated Flash Attention: fast paths against the dense float64 reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samlight.modeling.dilated_attention import (
    DilatedBranch,
    coverage_counts,
    dilated_attention,
    reference_dilated_attention,
)
from samlight.modeling.token_order import grid_to_sequence, sequence_to_grid

BRANCH_SETS = {
    "longnet3": ((16, 1), (64, 4), (256, 16)),
    "two-lengths": ((8, 1), (64, 2), (256, 8)),
    "single-local": ((32, 1),),
    "dilated-only": ((64, 4), (256, 16)),  # leaves some (head, position) pairs uncovered
}
CPU_BACKENDS = ("torch_cpu", "math")


def branches(name):
    return tuple(DilatedBranch(w, r) for w, r in BRANCH_SETS[name])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_qkv(batch, heads, n, dim, seed, dtype=torch.float32, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, n, dim, generator=generator, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("branch_set", BRANCH_SETS)
@pytest.mark.parametrize("heads,batch", [(1, 1), (3, 2), (4, 1), (8, 3)])
def test_matches_float64_reference(backend, branch_set, heads, batch):
    seed = hash((backend, branch_set, heads, batch)) % 10_000
    q, k, v = random_qkv(batch, heads, 256, 16, seed)
    expected = reference_dilated_attention(q.double(), k.double(), v.double(), branches(branch_set))
    actual = dilated_attention(q, k, v, branches(branch_set), backend=backend)
    assert actual.dtype == torch.float32
    assert rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize("order", ["rowmajor", "morton"])
def test_grid_mappings_round_trip_and_match_reference(order):
    grid = torch.randn(2, 16, 16, 32)
    seq = grid_to_sequence(grid, order)
    assert torch.equal(sequence_to_grid(seq, order, 16, 16), grid)
    q, k, v = (grid_to_sequence(torch.randn(2, 16, 16, 4 * 8), order).view(2, 256, 4, 8).transpose(1, 2)
               for _ in range(3))
    expected = reference_dilated_attention(q.double(), k.double(), v.double(), branches("longnet3"))
    assert rel_err(dilated_attention(q, k, v, branches("longnet3")), expected) < 1e-5


def test_morton_segments_are_square_tiles():
    rows = torch.arange(16).view(16, 1).expand(16, 16)
    cols = torch.arange(16).view(1, 16).expand(16, 16)
    coords = grid_to_sequence(torch.stack([rows, cols], -1)[None].float(), "morton")[0]
    first_tile = coords[:16]  # a segment of 16 tokens is a 4x4 tile
    assert first_tile[:, 0].max() == 3 and first_tile[:, 1].max() == 3
    stride = coords[:64:4]  # every 4th token of a 64-token segment is a stride-2 8x8 sub-grid... of its 8x8 tile
    assert set(stride[:, 0].tolist()) == {0, 2, 4, 6} and set(stride[:, 1].tolist()) == {0, 2, 4, 6}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("branch_set", ["longnet3", "dilated-only"])
def test_every_output_position_is_written(backend, branch_set):
    q, k, v = random_qkv(2, 4, 256, 8, seed=7)
    out = torch.full_like(q, float("nan"))
    result = dilated_attention(q, k, v, branches(branch_set), backend=backend, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    expected = reference_dilated_attention(q.double(), k.double(), v.double(), branches(branch_set))
    assert rel_err(out, expected) < 1e-5


def test_uncovered_positions_are_zero():
    # one head, dilation 4, no r=1 branch: three of every four positions are never attended
    q, k, v = random_qkv(1, 1, 64, 8, seed=3)
    out = dilated_attention(q, k, v, (DilatedBranch(64, 4),))
    covered = coverage_counts(64, 1, (DilatedBranch(64, 4),)).sum(-1)[0] > 0
    assert covered.sum() == 16
    assert torch.all(out[0, 0, ~covered] == 0) and torch.all(out[0, 0, covered].abs().sum(-1) > 0)


def test_heads_take_different_offsets_so_every_position_is_covered():
    counts = coverage_counts(256, 4, (DilatedBranch(64, 4),))
    per_head = counts.sum(-1) > 0  # (heads, positions)
    assert (per_head.sum(0) == 1).all()  # each position covered by exactly one head
    assert all(per_head[h, h::4].all() for h in range(4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_global_branch_is_plain_attention(backend):
    q, k, v = random_qkv(2, 3, 128, 16, seed=11)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    actual = dilated_attention(q, k, v, (DilatedBranch(128, 1),), backend=backend)
    assert rel_err(actual, expected) < 1e-5


def test_segment_longer_than_sequence_is_capped():
    q, k, v = random_qkv(1, 2, 64, 8, seed=5)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(dilated_attention(q, k, v, (DilatedBranch(4096, 1),)), expected) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("branch_set", ["longnet3", "two-lengths", "dilated-only"])
def test_gradients_match_reference(backend, branch_set):
    q, k, v = random_qkv(2, 4, 256, 8, seed=13, requires_grad=True)
    grad = torch.randn(2, 4, 256, 8, generator=torch.Generator().manual_seed(17))
    actual = torch.autograd.grad((dilated_attention(q, k, v, branches(branch_set), backend=backend) * grad).sum(),
                                 (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(
        (reference_dilated_attention(q64, k64, v64, branches(branch_set)) * grad.double()).sum(), (q64, k64, v64))
    for name, a, e in zip("qkv", actual, expected):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) < 1e-5, name


def test_gradcheck_in_float64():
    q, k, v = random_qkv(1, 2, 32, 4, seed=19, dtype=torch.float64, requires_grad=True)
    br = (DilatedBranch(8, 1), DilatedBranch(32, 4))
    assert torch.autograd.gradcheck(lambda a, b, c: dilated_attention(a, b, c, br, backend="torch_cpu"), (q, k, v))


@pytest.mark.parametrize("bad", [((48, 1),), ((64, 3),), ((0, 1),)])
def test_branches_that_do_not_tile_are_rejected(bad):
    q, k, v = random_qkv(1, 1, 256, 8, seed=1)
    with pytest.raises(ValueError, match="does not tile"):
        dilated_attention(q, k, v, tuple(DilatedBranch(*b) for b in bad))


def test_unknown_backend_is_rejected():
    q, k, v = random_qkv(1, 1, 64, 8, seed=1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        dilated_attention(q, k, v, (DilatedBranch(64, 1),), backend="nope")

"""The fused Triton inference kernel against the float64 reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from samlight.modeling import triton_dilated
from samlight.modeling.dilated_attention import DilatedBranch, dilated_attention, reference_dilated_attention

pytestmark = pytest.mark.skipif(not triton_dilated.available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "spec,heads,batch",
    [
        (((16, 1), (64, 4), (256, 16)), 4, 2),
        (((64, 4), (256, 16)), 2, 1),  # leaves positions uncovered: zeros there
        (((8, 1), (256, 2)), 3, 1),  # two different sparse lengths
        (((16, 1), (256, 2), (64, 4)), 4, 2),  # one launch for branches 0 and 2, another for branch 1
        (((256, 1),), 1, 1),  # plain global attention
    ],
)
@pytest.mark.slow
def test_triton_matches_reference_with_strided_qkv(spec, heads, batch):
    branches = tuple(DilatedBranch(*b) for b in spec)
    generator = torch.Generator().manual_seed(len(spec) * 10 + heads)
    # q, k, v as strided views of one qkv projection, the layout the encoder produces
    qkv = torch.randn(batch, 256, 3, heads, 16, generator=generator).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = dilated_attention(q, k, v, branches, backend="triton")
    expected = reference_dilated_attention(q.double(), k.double(), v.double(), branches)
    assert torch.isfinite(out).all()
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-5
    assert out.transpose(1, 2).is_contiguous()  # ready for the output projection


def test_triton_is_inference_only():
    q = torch.randn(1, 1, 64, 16, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        dilated_attention(q, q, q, (DilatedBranch(64, 1),), backend="triton")


FUSED_CASES = [(torch.float32, 384), (torch.float32, 100)]
if DEVICE == "cuda":  # Triton's CPU interpreter mishandles bfloat16 (numpy has no such type)
    FUSED_CASES.append((torch.bfloat16, 384))


@pytest.mark.parametrize("dtype,cols", FUSED_CASES)
def test_fused_add_layer_norm_matches_eager(dtype, cols):
    from samlight.modeling.add_norm import add_layer_norm_triton

    generator = torch.Generator().manual_seed(cols)
    x, y = (torch.randn(2, 37, cols, generator=generator).to(DEVICE, dtype) for _ in range(2))
    norm = torch.nn.LayerNorm(cols, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
        total, normed = add_layer_norm_triton(x, y, norm)
        expected_total = x + y
        expected = norm(expected_total)
    assert torch.equal(total, expected_total)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(normed.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_encoder_block_loop_with_fused_add_norm_equals_the_blocks(test_student, monkeypatch):
    """``run_blocks`` (fused add + LayerNorm) computes what calling the blocks one by one does."""
    from samlight.modeling import add_norm, image_encoder

    encoder = copy.deepcopy(test_student.image_encoder).to(DEVICE)
    seq = torch.randn(1, encoder.config.grid_size ** 2, encoder.config.embed_dim, device=DEVICE)
    with torch.no_grad():
        expected = seq
        for block in encoder.blocks:
            expected = block(expected)
        eager = encoder.run_blocks(seq)
        # the Triton kernel, as CUDA inference would pick it (the interpreter on CPU)
        monkeypatch.setattr(image_encoder, "add_layer_norm", add_norm.add_layer_norm_triton)
        fused = encoder.run_blocks(seq)
    assert torch.allclose(eager, expected, atol=1e-5)
    assert torch.allclose(fused, expected, atol=1e-4)

"""The fused Triton inference kernel against the float64 reference (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

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

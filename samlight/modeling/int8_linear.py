"""int8 linear layers for the CPU encoder (oneDNN, VNNI).

On CPUs with AVX512-VNNI (or AMX) an int8 GEMM does twice the multiply-adds per cycle of a bf16 one,
and the encoder's four linears per block are ~55% of its CPU time. Weights are quantized per output
channel (symmetric int8) once; activations per tensor (asymmetric uint8) on every call, from their own
min and max, so nothing needs calibrating. oneDNN applies both scales, the bias and an optional GELU in
the GEMM's epilogue and writes the layer's float output directly.

The GEMM is wrapped as a custom op so that ``torch.compile`` fuses the activation quantization into the
preceding kernels and leaves the prepacked GEMM alone (inductor's own int8 lowering expects weights
that ``torch.compile`` froze itself). Eager mode works too, but pays the quantization in separate passes.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn

from samlight.modeling.attention import SequenceAttention

ACTIVATIONS = ("none", "gelu")


def available() -> bool:
    """oneDNN's int8 GEMM is in this torch build (x86 CPUs)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@functools.cache
def activation_levels() -> int:
    """The uint8 activation range: 255 levels with VNNI/AMX; without them (AVX2) oneDNN's u8*s8 kernel adds
    pairs of products in int16, which saturates unless activations keep to 7 bits (PyTorch's reduce_range)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 127
    return 255 if any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8")) else 127


def companion_dtype() -> torch.dtype:
    """The dtype of everything around the int8 GEMMs: bf16 where oneDNN runs it natively (AVX512-BF16, AMX), else
    float32. Emulated bf16 is many times slower, and oneDNN's int8 GEMM with a bf16 output falls back to a
    reference kernel there (24 s for one 4096 x 256 x 768 product on an AVX2 EPYC)."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@torch.library.custom_op("samlight::int8_linear", mutates_args=())
def _int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise.tensor(
        x_q, x_scale, x_zero_point, packed_weight, weight_scale, weight_zero_point, bias,
        1.0, 0, out_dtype, activation, [], "none" if activation == "gelu" else "",  # exact (erf) GELU
    )


@_int8_linear.register_fake
def _(x_q, x_scale, x_zero_point, packed_weight, weight_scale, weight_zero_point, bias, activation, out_dtype):
    return x_q.new_empty((x_q.shape[0], weight_scale.shape[0]), dtype=out_dtype)


class Int8Linear(nn.Module):
    """``activation(linear(x))`` with int8 weights and dynamically quantized uint8 activations.

    Inference only, CPU only. The quantized weights are plain attributes, not buffers: the module is
    built from a float ``nn.Linear`` when a model is loaded and never saved or moved.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not available():
            raise ValueError("int8 linears need oneDNN (an x86 CPU build of torch)")
        weight = linear.weight.detach().float().cpu()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        self.weight_scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        weight_q = torch.round(weight / self.weight_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed_weight = torch.ops.onednn.qlinear_prepack(weight_q, None)
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float().cpu().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # the range always contains 0, so that zero (padding, ReLU-like outputs) stays exact
        low, high = torch.aminmax(rows)
        low, high = low.float().clamp(max=0), high.float().clamp(min=0)
        levels = activation_levels()
        scale = ((high - low) / levels).clamp(min=1e-12)
        zero_point = torch.round(-low / scale)
        x_q = (torch.round(rows.float() / scale) + zero_point).clamp(0, levels).to(torch.uint8)
        out = _int8_linear(x_q, scale, zero_point.int(), self.packed_weight, self.weight_scale,
                           self.weight_zero_point, self.bias, self.activation, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


def int8_encoder(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` whose attention and MLP linears are :class:`Int8Linear` (GELU fused into
    the first MLP layer). Patch embedding and neck stay as they are (~6% of the work, and the neck's
    output is the embedding itself). The original module is untouched."""
    quantized = copy.deepcopy(encoder).eval()
    for module in quantized.modules():
        if isinstance(module, SequenceAttention):
            module.qkv, module.proj = Int8Linear(module.qkv), Int8Linear(module.proj)
        elif isinstance(module, MLPBlock):
            if not (isinstance(module.act, nn.GELU) and module.act.approximate == "none"):
                raise ValueError(f"int8 MLP supports exact GELU only, got {module.act}")
            module.lin1, module.act = Int8Linear(module.lin1, activation="gelu"), nn.Identity()
            module.lin2 = Int8Linear(module.lin2)
    return quantized

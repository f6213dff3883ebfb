"""int8 linears for the CPU encoder: accuracy against float, compiled against eager, the predictor option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from torch import nn

from samlight.image_io import load_image
from samlight.modeling.int8_linear import Int8Linear, available, companion_dtype, int8_encoder
from samlight.predictor import Predictor

pytestmark = pytest.mark.skipif(not available(), reason="needs oneDNN's int8 GEMM (x86 CPU torch)")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(96, 160)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@torch.inference_mode()
def test_int8_linear_tracks_the_float_layer(linear, dtype, activation):
    # LayerNorm-like inputs with a few larger values, as the encoder's activations have
    x = torch.randn(2, 300, 96) * torch.linspace(0.2, 3.0, 96)
    expected = linear(x)
    expected = F.gelu(expected) if activation == "gelu" else expected
    out = Int8Linear(linear, activation)(x.to(dtype))
    assert out.shape == (2, 300, 160) and out.dtype == dtype
    assert relative_error(out, expected) < 0.03
    # and the quantization is not a no-op: int8 and float are not the same computation
    assert relative_error(out, expected) > 1e-4


@pytest.mark.slow  # compiling: 5 s
@torch.inference_mode()
def test_compiled_int8_linear_equals_eager(linear):
    layer = Int8Linear(linear, "gelu")
    x = torch.randn(512, 96).bfloat16()
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    assert relative_error(compiled, eager) < 0.02


def test_bad_activation_is_rejected(linear):
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Linear(linear, "relu6")


def test_int8_encoder_quantizes_a_copy(test_student):
    encoder = test_student.image_encoder
    before = {name: p.clone() for name, p in encoder.state_dict().items()}
    quantized = int8_encoder(encoder)
    layers = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * len(encoder.blocks)
    assert sum(m.activation == "gelu" for m in layers) == len(encoder.blocks)  # GELU moved into fc1
    assert not any(isinstance(m, Int8Linear) for m in encoder.modules())
    assert all(torch.equal(before[name], p) for name, p in encoder.state_dict().items())


def test_int8_encoder_rejects_an_approximate_gelu(test_student):
    encoder = copy.deepcopy(test_student.image_encoder)
    next(m for m in encoder.modules() if isinstance(m, MLPBlock)).act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="exact GELU"):
        int8_encoder(encoder)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiling: 8 s
def test_int8_predictor_stays_close_to_float32(test_student, coco_val_images, compiled):
    image = load_image(coco_val_images[3])
    exact = Predictor(copy.deepcopy(test_student), device="cpu")
    int8 = Predictor(copy.deepcopy(test_student), device="cpu", encoder_precision="int8", compile_encoder=compiled)
    a, b = exact.embed(image), int8.embed(image)
    if compiled:  # compiled indeed, not the eager fallback
        assert int8.encoder.error is None, int8.encoder.error
    # around the int8 GEMMs: bf16 only where the CPU runs it natively (emulated, it takes seconds per layer)
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert companion_dtype() == expected
    assert {p.dtype for p in int8.encoder.parameters()} == {expected}
    assert b.features.dtype == torch.float32 and b.features.shape == a.features.shape
    assert relative_error(b.features, a.features) < 0.03
    assert F.cosine_similarity(a.features.flatten(), b.features.flatten(), dim=0) > 0.999
    # the same decoder on either embedding: the mask logits move as little as the embedding
    box = np.array([40.0, 30.0, 400.0, 300.0])
    logits = [p.predict_embedding(e, box=box, multimask_output=False).low_res_logits for p, e in ((exact, a), (int8, b))]
    assert relative_error(torch.from_numpy(logits[1]), torch.from_numpy(logits[0])) < 0.05


def test_int8_precision_is_checked(test_student, test_teacher):
    with pytest.raises(ValueError, match="encoder_precision must be one of"):
        Predictor(copy.deepcopy(test_student), device="cpu", encoder_precision="fp16")
    with pytest.raises(ValueError, match="SAM-Lightening encoders on the CPU"):
        Predictor(copy.deepcopy(test_teacher), device="cpu", encoder_precision="int8")

"""Lightening encoder, configs and model assembly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from samlight.modeling import (
    STUDENT_CONFIGS,
    EncoderConfig,
    StudentConfig,
    build_student,
    build_teacher,
    seeded,
    student_config,
    teacher_config,
)


def test_named_configs_match_the_design():
    t = student_config("lightening_t").encoder
    assert (t.embed_dim, t.depth, t.patch_size, t.img_size, t.grid_size) == (384, 6, 16, 1024, 64)
    s = student_config("lightening_s").encoder
    assert s.embed_dim > t.embed_dim and s.depth > t.depth and s.global_attn_indexes
    for config in STUDENT_CONFIGS.values():
        config.encoder.validate()


@pytest.mark.parametrize("order", ["rowmajor", "morton"])
def test_encoder_output_and_block_features(order):
    config = StudentConfig("t", EncoderConfig(embed_dim=64, depth=3, num_heads=4, img_size=256, token_order=order,
                                              branches=((16, 1), (64, 4)), global_attn_indexes=(1,)))
    model = seeded(0, build_student, config)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        neck, blocks = model.image_encoder.forward_features(x)
        plain = model.image_encoder(x)
    assert neck.shape == plain.shape == (2, 256, 16, 16)
    assert torch.allclose(neck, plain, atol=1e-5)
    assert [b.shape for b in blocks] == [(2, 16, 16, 64)] * 3


def test_token_order_changes_the_function_but_not_the_shapes():
    base = EncoderConfig(embed_dim=64, depth=1, num_heads=4, img_size=256, branches=((16, 1),))
    x = torch.randn(1, 3, 256, 256)
    outs = []
    for order in ("rowmajor", "morton"):
        config = StudentConfig("t", EncoderConfig(**{**base.__dict__, "token_order": order}))
        with torch.no_grad():
            outs.append(seeded(0, build_student, config).image_encoder(x))
    # rows of 16 tokens vs 4x4 tiles attend differently
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_encoder_gradients_flow_to_every_parameter(test_student):
    model = seeded(1, build_student, student_config("lightening_test"))
    model.image_encoder.train()
    out = model.image_encoder(torch.randn(1, 3, 256, 256))
    out.square().mean().backward()
    missing = [n for n, p in model.image_encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_decoder_initialised_from_teacher(test_teacher):
    student = build_student(student_config("lightening_test"), teacher=test_teacher)
    for name in ("prompt_encoder", "mask_decoder"):
        ours, theirs = getattr(student, name).state_dict(), getattr(test_teacher, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_student_config_json_round_trip():
    config = student_config("lightening_s")
    restored = StudentConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(embed_dim=100, num_heads=6).validate()
    with pytest.raises(ValueError, match="does not tile"):
        EncoderConfig(branches=((3000, 1),)).validate()
    with pytest.raises(ValueError, match="unknown student config"):
        student_config("lightening_xxl")
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        StudentConfig.from_dict({"name": "x", "encoder": {"width": 3}})


def test_teacher_configs_build_segment_anything_models():
    teacher = seeded(0, build_teacher, teacher_config("vit_test"))
    assert type(teacher).__module__.startswith("segment_anything")
    with torch.no_grad():
        assert teacher.image_encoder(torch.randn(1, 3, 256, 256)).shape == (1, 256, 16, 16)


def test_fused_relative_position_attention_equals_sams():
    """The teacher's attention with its relative positions folded into one attention call: the same encoder
    output as segment_anything's, global and windowed blocks (padded windows included), same state dict."""
    import copy

    from samlight.modeling.sam_attention import FusedRelPosAttention, fuse_rel_pos_attention

    teacher = seeded(0, build_teacher, teacher_config("vit_test"))
    encoder = teacher.image_encoder.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in encoder.blocks:  # SAM zero-initialises them: give them values that matter
            block.attn.rel_pos_h.copy_(torch.randn(block.attn.rel_pos_h.shape, generator=g))
            block.attn.rel_pos_w.copy_(torch.randn(block.attn.rel_pos_w.shape, generator=g))
    fused = copy.deepcopy(encoder)
    assert fuse_rel_pos_attention(fused) == len(encoder.blocks)
    assert all(isinstance(b.attn, FusedRelPosAttention) for b in fused.blocks)
    assert fused.state_dict().keys() == encoder.state_dict().keys()
    x = torch.randn(2, 3, 256, 256, generator=g)
    with torch.no_grad():
        expected, actual = encoder(x), fused(x)
        assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4), (actual - expected).abs().max()
        # the relative terms are not a no-op here: without them the output differs
        for block in fused.blocks:
            block.attn.use_rel_pos = False
        assert not torch.allclose(fused(x), expected, atol=1e-2)


def test_seeded_builds_are_identical_and_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = seeded(5, build_student, student_config("lightening_test"))
    after = torch.rand(1)
    b = seeded(5, build_student, student_config("lightening_test"))
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_patch_embedding_gemm_equals_the_convolution(test_student):
    encoder = test_student.image_encoder
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(encoder.embed_patches(x), encoder.patch_embed(x), atol=1e-4)


def test_channels_last_neck_equals_segment_anythings_neck(test_student):
    encoder = copy.deepcopy(test_student.image_encoder).double()
    for p in encoder.neck.parameters():  # not the identity init: LayerNorm weights and biases count too
        torch.nn.init.normal_(p, std=0.5)
    grid = torch.randn(2, 16, 16, encoder.config.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        expected = encoder.neck(grid.permute(0, 3, 1, 2))
        got = encoder.apply_neck(grid)
    assert got.shape == expected.shape == (2, 256, 16, 16)
    assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10)


def test_training_after_inference_in_the_same_process(test_student):
    """Index tensors cached during inference must not be inference tensors (they are saved for backward)."""
    from samlight.modeling import token_order

    token_order._index_on.cache_clear()
    token_order._sequence_index_cpu.cache_clear()
    token_order._grid_index_cpu.cache_clear()
    model = seeded(2, build_student, student_config("lightening_test"))
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        model.image_encoder(x)
    model.image_encoder(x).sum().backward()
    assert model.image_encoder.pos_embed.grad is not None

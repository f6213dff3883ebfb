"""DLD building blocks: layer mapping, dynamic weights, teacher feature cache, prompt sampling, CLI errors."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch

from samlight.cli import main
from samlight.distill import FineTuneConfig, dynamic_layer_weights, layer_mapping
from samlight.distill.data import masks_to_low_res, prepare_image
from samlight.distill.feature_cache import TeacherFeatureCache
from samlight.distill.prompts import random_prompts, sample_prompts


def test_layer_mapping_is_ceil_l_times_lt_over_ls():
    one_based = lambda ls, lt: [b + 1 for b in layer_mapping(ls, lt)]  # noqa: E731
    assert one_based(6, 32) == [6, 11, 16, 22, 27, 32]  # lightening_t <- vit_h
    assert one_based(6, 12) == [2, 4, 6, 8, 10, 12]  # lightening_t <- vit_b
    assert one_based(8, 24) == [3, 6, 9, 12, 15, 18, 21, 24]
    assert one_based(2, 4) == [2, 4]
    assert one_based(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        layer_mapping(0, 12)


def test_dynamic_weights_move_from_shallow_to_deep():
    total, layers = 100, 6
    history = [dynamic_layer_weights(s, total, layers) for s in range(total)]
    assert all(abs(sum(w) - 1) < 1e-9 for w in history)
    assert int(np.argmax(history[0])) == 0 and int(np.argmax(history[-1])) == layers - 1
    focus = [sum(i * w for i, w in enumerate(ws)) for ws in history]  # weighted mean layer
    assert all(b >= a - 1e-12 for a, b in zip(focus, focus[1:])) and focus[-1] > 4 and focus[0] < 1
    assert dynamic_layer_weights(0, 1, 1) == [1.0]
    with pytest.raises(ValueError):
        dynamic_layer_weights(0, 10, 3, sigma=0)


def _entry(seed: int, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"neck": torch.randn(4, size, size, generator=g), "block1": torch.randn(size, size, 8, generator=g)}


def test_feature_cache_roundtrip_identity_and_fp16(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "random:vit_test:0")
    key = cache.key("img", 256, [1, 3])
    assert key != TeacherFeatureCache(tmp_path, "random:vit_test:1").key("img", 256, [1, 3])
    assert key != cache.key("img", 256, [0, 3]) and key != cache.key("img2", 256, [1, 3])
    assert cache.get(key) is None
    entry = _entry(0)
    cache.put(key, entry)
    back = cache.get(key)
    assert back["neck"].dtype == torch.float16
    torch.testing.assert_close(back["neck"].float(), entry["neck"], atol=2e-3, rtol=1e-3)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    # no temporary file is left behind
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    with pytest.raises(ValueError, match="float16"):
        cache.put(cache.key("big", 256, []), {"neck": torch.full((2,), 1e6)})


def test_feature_cache_is_bounded_lru_and_survives_torn_files(tmp_path):
    probe = TeacherFeatureCache(tmp_path / "probe", "t")
    probe.put("k", _entry(0))
    size = probe.nbytes
    cache = TeacherFeatureCache(tmp_path / "c", "t", max_bytes=int(size * 3.5))
    keys = [cache.key(f"img{i}", 256, [1]) for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, _entry(i))
        os.utime(cache._path(key), (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(keys[0]) is not None  # touched: now the most recent
    cache.put(keys[3], _entry(3))
    assert cache.nbytes <= cache.max_bytes
    assert keys[0] in cache and keys[1] not in cache and keys[3] in cache
    # a file torn by a crash is dropped, not trusted
    cache._path(keys[2]).write_bytes(b"\x00" * 10)
    assert cache.get(keys[2]) is None and keys[2] not in cache
    # a stale temporary file of a killed writer is swept at the next start
    stale = cache._path(keys[3]).parent / ".tmp-123-1-x.safetensors"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    TeacherFeatureCache(tmp_path / "c", "t")
    assert not stale.exists()


def test_sam_transform_and_low_res_targets():
    image = np.zeros((100, 200, 3), np.uint8)
    prepared = prepare_image(image, 256)
    assert prepared.pixels.shape == (3, 256, 256) and prepared.input_size == (128, 256)
    mask = np.zeros((100, 200), bool)
    mask[:50, :100] = True
    low = masks_to_low_res([mask], prepared.input_size, 64, 256)
    assert low.shape == (1, 64, 64) and low[0, :16, :32].all() and low.sum() == 16 * 32


def test_prompt_sampling_from_masks():
    masks = [np.zeros((60, 80), bool) for _ in range(3)]
    masks[0][10:40, 10:50] = True
    masks[1][45:58, 60:78] = True
    masks[2][0:2, 0:2] = True  # too small to prompt
    rng = np.random.default_rng(0)
    prompts = sample_prompts(masks, (60, 80), rng, max_instances=8, box_fraction=0.5)
    chosen = list(prompts.box_gt) + list(prompts.point_gt)
    assert sorted(chosen) == [0, 1]
    for box, gt in zip(prompts.boxes, prompts.box_gt):
        assert box[2] > box[0] and box[3] > box[1]
    for pts, labels, gt in zip(prompts.points, prompts.labels, prompts.point_gt):
        assert labels[0] == 1 and masks[gt][int(pts[0][1]), int(pts[0][0])]
        if labels[1] == 0:
            assert not masks[gt][int(pts[1][1]), int(pts[1][0])]
    empty = sample_prompts([], (60, 80), rng, max_instances=3)
    assert len(empty.points) == 3 and (empty.point_gt == -1).all()
    boxed = sample_prompts([], (60, 80), rng, max_instances=3, boxes_without_masks=[[5, 5, 40, 30]])
    assert len(boxed.boxes) == 1 and len(boxed.points) == 0 and (boxed.box_gt == -1).all()


def test_random_prompts_lie_in_each_image_and_follow_the_generator():
    sizes = [(768, 1024), (1024, 600)]
    prompts = random_prompts(sizes, 5, torch.Generator().manual_seed(3))
    assert len(prompts) == 2
    for (h, w), p in zip(sizes, prompts):
        boxes, points = p["box"]["boxes"], p["point"]["points"]
        assert boxes.shape == (2, 4) and points.shape == (3, 1, 2) and p["point"]["labels"].tolist() == [[1]] * 3
        assert (boxes[:, 2:] - boxes[:, :2] >= 0.05 * torch.tensor([w, h]) - 1e-3).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert (points[..., 0] <= w).all() and (points[..., 1] <= h).all() and (points >= 0).all()
    again = random_prompts(sizes, 5, torch.Generator().manual_seed(3))
    assert torch.equal(again[1]["box"]["boxes"], prompts[1]["box"]["boxes"])
    assert random_prompts(sizes, 1, torch.Generator())[0]["box"] is None  # one prompt: a click


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        FineTuneConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="nothing to do"):
        FineTuneConfig(encoder_steps=0, decoder_steps=0).validate()


def test_cli_errors(tmp_path, coco_tiny, capsys):
    assert main(["distill", "--teacher", "random:vit_test", "--out", str(tmp_path / "o")]) == 2
    assert "training data" in capsys.readouterr().err
    assert main(["distill", "--teacher", "random:vit_test", "--student", "lightening_t", "--images",
                 str(coco_tiny / "val2017"), "--out", str(tmp_path / "o"), "--max-images", "1"]) == 2
    assert "px" in capsys.readouterr().err  # 256 px teacher vs 1024 px student
    assert main(["distill", "--teacher", "random:nope", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_random_views_crop_flip_and_recolour_within_bounds():
    from samlight.distill.augment import MIN_CROP, apply_view, sample_view

    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    prepared = prepare_image(image, 256)  # valid region 154 x 256
    views = [sample_view(prepared.input_size, np.random.default_rng(seed)) for seed in range(20)]
    assert len({(v.height, v.width) for v in views}) > 10 and {v.flip for v in views} == {True, False}
    for view in views:
        assert MIN_CROP * 154 - 1 <= view.height <= 154 and MIN_CROP * 256 - 1 <= view.width <= 256
        assert view.top + view.height <= 154 and view.left + view.width <= 256
        pixels, size = apply_view(prepared.pixels, view)
        assert pixels.shape == (3, 256, 256) and max(size) == 256
        assert pixels.min() >= 0 and pixels.max() <= 255
        assert not pixels[:, size[0]:, :].any() and not pixels[:, :, size[1]:].any()  # zero padded as SAM does
    assert sample_view(prepared.input_size, np.random.default_rng(3)) == views[3]  # a function of the seed
    whole = dataclasses.replace(views[0], top=0, left=0, height=154, width=256, flip=True, contrast=1.0, brightness=0.0)
    flipped, size = apply_view(prepared.pixels, whole)
    assert size == (154, 256)
    assert torch.allclose(flipped[:, :154, :256], prepared.pixels[:, :154, :256].float().flip(-1), atol=1e-3)


@pytest.mark.parametrize("clicks", [2, 1])  # a click and its negative: 3 tokens; a lone click: 2, as a box
def test_decoder_stage_decodes_a_batch_as_sam_does_image_by_image(clicks):
    """The decoder stage's one pass per prompt length gives each group what SAM's own decoder gives it, in the
    order the losses read them (image by image, boxes before points), with gradients to the decoder."""
    from samlight.distill.trainer import decode
    from samlight.models import ModelSpec

    torch.manual_seed(0)
    sam = ModelSpec.parse("random:vit_test").load()
    side = sam.prompt_encoder.image_embedding_size[0]
    embeddings = torch.randn(3, sam.prompt_encoder.embed_dim, side, side)
    box = lambda k: {"boxes": torch.rand(k, 4) * 500}  # noqa: E731
    point = lambda k: {"points": torch.rand(k, clicks, 2) * 500,  # noqa: E731
                       "labels": torch.tensor([[1, 0], [1, -1]] * k)[:k, :clicks]}
    prompts = [{"box": box(2), "point": point(3)}, {"box": None, "point": point(1)}, {"box": box(1), "point": None}]

    outputs = decode(sam, embeddings, prompts)

    pe = sam.prompt_encoder.get_dense_pe()
    expected = []
    for i, p in enumerate(prompts):
        for kind in ("box", "point"):
            if p[kind] is None:
                continue
            points = (p[kind]["points"], p[kind]["labels"]) if kind == "point" else None
            sparse, dense = sam.prompt_encoder(points=points, boxes=p[kind].get("boxes"), masks=None)
            expected.append(sam.mask_decoder(embeddings[i:i + 1], pe, sparse, dense, multimask_output=True))
    assert [low.shape for low, _ in outputs] == [low.shape for low, _ in expected]
    assert [len(low) for low, _ in outputs] == [2, 3, 1, 1]
    for (low, iou), (want_low, want_iou) in zip(outputs, expected):
        torch.testing.assert_close(low, want_low, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=1e-4)
    sum(low.mean() + iou.mean() for low, iou in outputs).backward()
    assert sam.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0

"""Predictor on real COCO photos: sizes, EXIF, batched prompts, cache, bad prompts."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from samlight.embedding_cache import EmbeddingCache
from samlight.image_io import ImageError, ImageLimits, decode_image, load_image
from samlight.predictor import Predictor, image_key


@pytest.fixture(scope="module")
def predictor(test_student):
    return Predictor(test_student, device="cpu", cache=EmbeddingCache(max_entries=3))


@pytest.fixture(scope="module")
def photo(coco_val_images):
    return load_image(coco_val_images[0])


def test_masks_come_back_at_the_original_size(predictor, photo):
    predictor.set_image(photo)
    h, w = photo.shape[:2]
    masks, scores, logits = predictor.predict(box=np.array([w * 0.2, h * 0.2, w * 0.7, h * 0.8]))
    assert masks.shape == (3, h, w) and masks.dtype == bool
    grid = predictor.model.image_encoder.img_size // 16
    assert scores.shape == (3,) and logits.shape == (3, 4 * grid, 4 * grid)
    single, score, _ = predictor.predict(np.array([[w / 2, h / 2]]), np.array([1]), multimask_output=False)
    assert single.shape == (1, h, w) and score.shape == (1,)


def test_predictions_match_segment_anything_reference_predictor(test_student, photo):
    """Same model, same prompt: our predictor and segment_anything's SamPredictor agree."""
    from segment_anything import SamPredictor

    ours = Predictor(test_student, device="cpu")
    emb = ours.embed(photo)
    reference = SamPredictor(test_student)
    reference.set_image(photo)
    box = np.array([50, 60, 300, 400])
    theirs = reference.predict(box=box)
    mine = ours.predict_embedding(emb, box=box)
    # bicubic resize on the model's device vs PIL: tiny differences in pixels, not in masks
    assert np.abs(mine.scores - theirs[1]).max() < 2e-2
    agreement = (mine.masks == theirs[0]).mean()
    assert agreement > 0.98


def test_batched_prompts_equal_one_by_one(predictor, photo):
    emb = predictor.embed(photo)
    boxes = np.array([[10, 10, 200, 200], [100, 50, 400, 300], [0, 0, 640, 480]])
    batched = predictor.predict_embedding(emb, box=boxes)
    assert batched.masks.shape[:2] == (3, 3)
    for i, box in enumerate(boxes):
        single = predictor.predict_embedding(emb, box=box)
        assert np.allclose(single.scores, batched.scores[i], atol=1e-4)
        assert (single.masks == batched.masks[i]).mean() > 0.999


@pytest.mark.parametrize("prompt", [{"point_coords": np.array([[320.0, 240.0]]), "point_labels": np.array([1])},
                                    {"box": np.array([40.0, 30.0, 500.0, 420.0]), "multimask_output": False}])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_predict_best_is_the_best_candidate(test_student, photo, prompt, device):
    """The click path (best candidate chosen and upsampled on the device) equals choosing from
    ``predict_embedding``'s full output, and its logits are the chosen candidate's."""
    predictor = Predictor(copy.deepcopy(test_student), device=device)
    emb = predictor.embed(photo)
    full = predictor.predict_embedding(emb, **prompt)
    masks, scores, low_res = predictor.predict_best(emb, **prompt)
    best = int(np.argmax(full.scores))
    assert masks.shape == (1, *photo.shape[:2]) and np.array_equal(masks[0].cpu().numpy(), full.masks[best])
    assert scores[0] == pytest.approx(float(full.scores[best]), abs=1e-5)
    assert np.allclose(low_res[0].cpu().numpy(), full.low_res_logits[best], atol=1e-4)


def test_predict_best_batches_prompts_and_takes_the_previous_mask(test_student, photo):
    """K prompts in one call give each prompt's own answer; ``mask_input`` is SAM's: the same as
    ``predict_embedding`` with the previous low-res logits."""
    predictor = Predictor(copy.deepcopy(test_student), device="cpu")
    emb = predictor.embed(photo)
    one, two = [[100.0, 100.0], [120.0, 90.0]], [[300.0, 200.0], [320.0, 220.0]]
    points = np.array([one, two])
    labels = np.array([[1, 1], [1, 0]])
    masks, scores, low_res = predictor.predict_best(emb, points, labels, multimask_output=False)
    for k, (p, l) in enumerate(((one, [1, 1]), (two, [1, 0]))):
        alone = predictor.predict_embedding(emb, np.array(p), np.array(l), multimask_output=False)
        assert (masks[k].numpy() == alone.masks[0]).mean() > 0.999 and scores[k] == pytest.approx(
            float(alone.scores[0]), abs=1e-4)
    refined, _, _ = predictor.predict_best(emb, np.array([two]), np.array([[1, 0]]), mask_input=[low_res[0]],
                                           multimask_output=False)
    reference = predictor.predict_embedding(emb, np.array(two), np.array([1, 0]),
                                            mask_input=low_res[0].numpy()[None], multimask_output=False)
    assert np.array_equal(refined[0].numpy(), reference.masks[0])
    assert not np.array_equal(refined[0].numpy(), masks[1].numpy())  # the previous mask changed the answer


def test_embedding_cache_hits_and_bounds(test_student, coco_val_images):
    cache = EmbeddingCache(max_entries=2)
    predictor = Predictor(test_student, device="cpu", cache=cache)
    images = [load_image(p) for p in coco_val_images[:3]]
    for image in images:
        predictor.embed(image)
    assert len(cache) == 2 and not predictor.is_cached(image_key(images[0]))
    predictor.embed(images[2])
    assert cache.stats()["hits"] == 1
    predictor.embed(images[0], key="custom-key")
    assert predictor.is_cached("custom-key")
    byte_bound = EmbeddingCache(max_entries=100, max_bytes=predictor.embed(images[1]).nbytes * 2 + 1)
    p2 = Predictor(test_student, device="cpu", cache=byte_bound)
    p2.embed_many(images)
    assert len(byte_bound) == 2 and byte_bound.nbytes <= byte_bound.max_bytes


def test_embed_many_is_one_batch_and_equals_single(test_student, coco_val_images):
    images = [load_image(p) for p in coco_val_images[:2]]
    together = Predictor(test_student, device="cpu").embed_many(images + images[:1])
    alone = Predictor(test_student, device="cpu").embed(images[1])
    assert together[0] is together[2]  # duplicate image embedded once
    assert torch.allclose(together[1].features, alone.features, atol=1e-4)


def test_exif_orientation_is_applied(tmp_path, photo):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(photo).save(buffer, format="JPEG", exif=exif)
    upright = decode_image(buffer.getvalue())
    assert upright.shape == (photo.shape[1], photo.shape[0], 3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"point_coords": [[10000, 5]], "point_labels": [1]}, "outside"),
        ({"point_coords": [[-1, 5]], "point_labels": [1]}, "outside"),
        ({"point_coords": [[float("nan"), 5]], "point_labels": [1]}, "NaN"),
        ({"point_coords": [[5, 5]], "point_labels": [2]}, "1 \\(foreground\\) or 0"),
        ({"point_coords": [[5, 5, 5]], "point_labels": [1]}, "last dimension of 2"),
        ({"point_coords": [[5, 5]], "point_labels": [1, 0]}, "do not match"),
        ({"point_coords": [[5, 5]]}, "point_labels are required"),
        ({"box": [10, 10, 10, 50]}, "empty box"),
        ({"box": [50, 10, 10, 50]}, "empty box"),
        ({"box": [1, 2, 3]}, "last dimension of 4"),
        ({"box": [5000, 5000, 6000, 6000]}, "outside"),
        ({"box": ["a", 1, 2, 3]}, "numeric"),
        ({}, "at least one prompt"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, photo, kwargs, message):
    emb = predictor.embed(photo)
    with pytest.raises(ValueError, match=message):
        predictor.predict_embedding(emb, **kwargs)


def test_image_limits_and_non_images(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(data, ImageLimits(max_bytes=1000))
    with pytest.raises(ImageError, match="pixels exceeds"):
        decode_image(data, ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(b"<html>not an image</html>")
    gray = decode_image(_png(np.zeros((5, 7), np.uint8) + 9))
    assert gray.shape == (5, 7, 3)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bf16_encoder_on_cpu_stays_close_to_float32(coco_val_images):
    from samlight.modeling import build_student, seeded, student_config

    image = load_image(coco_val_images[2])
    exact = Predictor(seeded(0, build_student, student_config("lightening_test")), device="cpu")
    half = Predictor(seeded(0, build_student, student_config("lightening_test")), device="cpu",
                     encoder_precision="bf16")
    a, b = exact.embed(image).features, half.embed(image).features
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.slow
def test_compiled_cpu_encoder_equals_eager(test_student, coco_val_images):
    """``compile_encoder`` (the CPU speed option) computes the same embedding as the eager encoder."""
    image = load_image(coco_val_images[1])
    eager = Predictor(copy.deepcopy(test_student), device="cpu").embed(image).features
    predictor = Predictor(copy.deepcopy(test_student), device="cpu", compile_encoder=True)
    compiled = predictor.embed(image).features
    assert predictor.encoder.error is None, predictor.encoder.error  # compiled, not the eager fallback
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4), (compiled - eager).abs().max()


def test_compiled_encoder_falls_back_to_eager_when_compilation_fails(test_student):
    """A torch build that cannot compile the encoder still serves it, eagerly."""
    from samlight.encoder_wrappers import CompiledEncoder

    def broken_compiler(graph, example_inputs):
        raise RuntimeError("this build cannot compile")

    encoder = CompiledEncoder(copy.deepcopy(test_student.image_encoder), backend=broken_compiler)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        out, expected = encoder(x), test_student.image_encoder(x)
        assert encoder.error == "RuntimeError: this build cannot compile"
        assert torch.equal(encoder(x), expected)  # later calls go straight to the eager module
    assert torch.equal(out, expected)

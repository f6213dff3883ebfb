"""Brush RLE: the vectorised encoder emits label_studio_sdk's bytes, and the sdk's decoder reads them back."""

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

import json

from backend.rle import BrushRle, dumps, encode_values, mask_to_rle, mask_to_rle_base64, rle_from_base64, rle_to_mask


def disc(height, width, cx, cy, r):
    yy, xx = np.mgrid[:height, :width]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2).astype(np.uint8) * 255


def test_1024_mask_matches_sdk_and_round_trips():
    mask = disc(1024, 1024, 500, 400, 300)
    mask[900:, :] = 255  # a run longer than 65536 values (several 16-bit chunks)
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask)
    assert np.array_equal(rle_to_mask(rle, 1024, 1024), mask)


def test_noisy_mask_matches_sdk():
    rng = np.random.default_rng(0)
    mask = (rng.random((200, 300)) < 0.5).astype(np.uint8) * 255
    assert mask_to_rle(mask) == mask2rle(mask)
    assert mask_to_rle(mask.astype(bool)) == mask2rle(mask)
    # the form a job result carries between worker and backend
    assert list(rle_from_base64(mask_to_rle_base64(mask))) == mask2rle(mask)


@pytest.mark.parametrize("length", [1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 131073, 200001])
def test_run_length_boundaries(length):
    flat = np.zeros(length, np.uint8)
    assert encode_values(flat) == encode_rle(flat)
    flat[-1] = 255
    assert encode_values(flat) == encode_rle(flat)


def test_random_value_sequences():
    rng = np.random.default_rng(1)
    for trial in range(200):
        count = int(rng.integers(1, 300))
        if trial % 2:
            flat = np.repeat(rng.integers(0, 4, count), rng.integers(1, 400, count)).astype(np.uint8)
        else:
            flat = rng.integers(0, 256, count).astype(np.uint8)
        rle = encode_values(flat)
        assert rle == encode_rle(flat), trial
        assert np.array_equal(decode_rle(bytes(rle)), flat)


def test_bad_masks_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="bool or uint8"):
        mask_to_rle(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="expected 3x3x4"):
        rle_to_mask(mask_to_rle(np.zeros((2, 2), np.uint8)), 3, 3)


def test_dumps_writes_brush_rle_as_the_json_list_label_studio_reads():
    rng = np.random.default_rng(2)
    mask = (rng.random((60, 80)) < 0.5).astype(np.uint8) * 255
    rle = rle_from_base64(mask_to_rle_base64(mask))
    body = {"results": [{"value": {"rle": rle, "format": "rle", "note": '"quoted" \\ and a token-like -0'},
                         "score": 0.5}, {"value": {"rle": BrushRle(b"")}}], "model_version": "v1"}
    parsed = json.loads(dumps(body))
    assert parsed["results"][0]["value"]["rle"] == mask2rle(mask)
    assert parsed["results"][0]["value"]["note"] == body["results"][0]["value"]["note"]
    assert parsed["results"][1]["value"]["rle"] == [] and parsed["model_version"] == "v1"
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})

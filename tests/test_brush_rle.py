"""Brush RLE encoder (samlight.brush_rle): label_studio_sdk's bytes on every device, read back by the sdk."""

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from serving.labelstudio import rle_to_mask
from samlight.brush_rle import encode_values, mask_to_rle, mask_to_rle_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def disc(height, width, cx, cy, r):
    yy, xx = np.mgrid[:height, :width]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2).astype(np.uint8) * 255


@pytest.mark.parametrize("device", DEVICES)
def test_1024_mask_matches_sdk_and_round_trips(device):
    mask = disc(1024, 1024, 500, 400, 300)
    mask[900:, :] = 255  # a run longer than 65536 values (several 16-bit chunks)
    rle = mask_to_rle(torch.from_numpy(mask).to(device))
    assert rle == mask2rle(mask)
    assert np.array_equal(rle_to_mask(rle, 1024, 1024), mask)


@pytest.mark.parametrize("device", DEVICES)
def test_noisy_bool_mask_matches_sdk(device):
    rng = np.random.default_rng(0)
    mask = rng.random((200, 300)) < 0.5
    assert mask_to_rle_bytes(torch.from_numpy(mask).to(device)) == bytes(mask2rle(mask.astype(np.uint8) * 255))
    assert mask_to_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)  # numpy in, same bytes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 131073, 200001])
def test_run_length_boundaries(device, length):
    flat = np.zeros(length, np.uint8)
    assert encode_values(torch.from_numpy(flat).to(device)) == encode_rle(flat)
    flat[-1] = 255
    assert encode_values(torch.from_numpy(flat).to(device)) == encode_rle(flat)


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


def test_edge_masks():
    for mask in (np.zeros((3, 5), bool), np.ones((3, 5), bool), np.ones((1, 1), bool)):
        assert mask_to_rle(mask) == mask2rle(mask.astype(np.uint8) * 255), mask.shape
    assert decode_rle(mask_to_rle_bytes(np.zeros((0, 4), bool))).size == 0  # the sdk's encoder fails on it


def test_bad_masks_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="bool or uint8"):
        mask_to_rle(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="expected 3x3x4"):
        rle_to_mask(mask_to_rle(np.zeros((2, 2), np.uint8)), 3, 3)

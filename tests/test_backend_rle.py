"""Brush RLE on the backend: base64 from the worker, Label Studio's JSON list out."""

import base64
import json

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from serving.labelstudio import BrushRle, dumps, rle_from_base64
from samlight.brush_rle import mask_to_rle_bytes


def test_dumps_writes_brush_rle_as_the_json_list_label_studio_reads():
    rng = np.random.default_rng(2)
    mask = (rng.random((60, 80)) < 0.5).astype(np.uint8) * 255
    rle = rle_from_base64(base64.b64encode(mask_to_rle_bytes(mask)).decode())  # what a job result carries
    body = {"results": [{"value": {"rle": rle, "format": "rle", "note": '"quoted" \\ and a token-like -0'},
                         "score": 0.5}, {"value": {"rle": BrushRle(b"")}}], "model_version": "v1"}
    parsed = json.loads(dumps(body))
    assert parsed["results"][0]["value"]["rle"] == mask2rle(mask)
    assert parsed["results"][0]["value"]["note"] == body["results"][0]["value"]["note"]
    assert parsed["results"][1]["value"]["rle"] == [] and parsed["model_version"] == "v1"
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})


def test_bad_base64_is_rejected():
    with pytest.raises(ValueError):
        rle_from_base64("not base64!")

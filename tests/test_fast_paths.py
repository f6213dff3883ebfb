"""The serving fast paths compute what segment_anything computes."""

from __future__ import annotations

import pytest
import torch

from samlight.fast_decoder import embed_prompts


@pytest.mark.parametrize("with_points,with_box", [(True, False), (True, True), (False, True)])
def test_graph_safe_prompt_embedding_equals_segment_anything(test_student, with_points, with_box):
    encoder = test_student.prompt_encoder
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(3, 4, 2, generator=g) * 256 if with_points else None
    labels = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.int) if with_points else None
    boxes = torch.tensor([[10.0, 20.0, 100.0, 200.0]] * 3) if with_box else None
    with torch.no_grad():
        expected = encoder(points=(coords, labels) if with_points else None, boxes=boxes, masks=None)
        actual = embed_prompts(encoder, coords, labels, boxes)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert torch.allclose(a, e, atol=1e-6)

"""The serving fast paths compute what segment_anything computes."""

from __future__ import annotations

import copy

import pytest
import torch

from samlight.graphed_decoder import embed_prompts


@pytest.mark.parametrize("with_points,with_box,with_mask", [(True, False, False), (True, True, False),
                                                             (False, True, False), (True, False, True)])
def test_graph_safe_prompt_embedding_equals_segment_anything(test_student, with_points, with_box, with_mask):
    encoder = test_student.prompt_encoder
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(3, 4, 2, generator=g) * 256 if with_points else None
    labels = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.int) if with_points else None
    boxes = torch.tensor([[10.0, 20.0, 100.0, 200.0]] * 3) if with_box else None
    masks = torch.randn(3, 1, *encoder.mask_input_size, generator=g) if with_mask else None
    with torch.no_grad():
        expected = encoder(points=(coords, labels) if with_points else None, boxes=boxes, masks=masks)
        actual = embed_prompts(encoder, coords, labels, boxes, masks)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert torch.allclose(a, e, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _churn(like: torch.Tensor) -> None:
    """Allocate and free NaN-filled blocks of a graph input's size: a graph that reads memory it does not own
    (a freed input) then reads NaN."""
    junk = [torch.full_like(like, float("nan")) for _ in range(8)]
    del junk


def _eager(model, features, coords, labels, masks, multimask: bool):
    """SAM's own prompt encoder and mask decoder: what a graph replay must give."""
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
        return model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)


@needs_cuda
def test_graphed_decoder_replays_equal_eager_after_memory_churn(test_student):
    from samlight.graphed_decoder import GraphedPromptDecoder

    model = copy.deepcopy(test_student).cuda().eval()
    graphed = GraphedPromptDecoder(model, autocast=False)
    height, width = model.prompt_encoder.image_embedding_size
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        features = torch.randn(1, 256, height, width, device="cuda", generator=g)
        coords = torch.rand(1, 2, 2, device="cuda", generator=g) * model.image_encoder.img_size
        labels = torch.tensor([[1, 0]], device="cuda", dtype=torch.int)
        low_res, iou = graphed(features, coords, labels, None, True)
        _churn(model.prompt_encoder.get_dense_pe())
        expected_low, expected_iou = _eager(model, features, coords, labels, None, True)
        assert torch.allclose(low_res, expected_low, atol=1e-3), step
        assert torch.allclose(iou, expected_iou, atol=1e-4), step


@needs_cuda
def test_graphed_decoder_with_the_previous_mask_equals_eager(test_student):
    """A refining click (the previous low-res logits as mask input) replays its own graph, SAM's numbers."""
    from samlight.graphed_decoder import GraphedPromptDecoder

    model = copy.deepcopy(test_student).cuda().eval()
    graphed = GraphedPromptDecoder(model, autocast=False)
    height, width = model.prompt_encoder.image_embedding_size
    g = torch.Generator(device="cuda").manual_seed(2)
    for step in range(3):
        features = torch.randn(1, 256, height, width, device="cuda", generator=g)
        coords = torch.rand(2, 3, 2, device="cuda", generator=g) * model.image_encoder.img_size
        labels = torch.tensor([[1, 0, 1], [1, 1, 0]], device="cuda", dtype=torch.int)
        masks = torch.randn(2, 1, *model.prompt_encoder.mask_input_size, device="cuda", generator=g) * 4
        low_res, iou = graphed(features, coords, labels, None, False, masks)
        _churn(masks)
        expected_low, expected_iou = _eager(model, features, coords, labels, masks, False)
        assert torch.allclose(low_res, expected_low, atol=1e-3), step
        assert torch.allclose(iou, expected_iou, atol=1e-4), step


@needs_cuda
def test_bf16_graphed_decoder_stays_close_to_float32(test_student):
    """The bf16 decoder (its own bf16 weight copy, no autocast) against SAM's float32 decoder."""
    from samlight.graphed_decoder import GraphedPromptDecoder

    model = copy.deepcopy(test_student).cuda().eval()
    graphed = GraphedPromptDecoder(model, autocast=True)
    assert next(graphed.mask_decoder.parameters()).dtype == torch.bfloat16
    assert next(model.mask_decoder.parameters()).dtype == torch.float32  # the model keeps its weights
    height, width = model.prompt_encoder.image_embedding_size
    g = torch.Generator(device="cuda").manual_seed(1)
    features = torch.randn(1, 256, height, width, device="cuda", generator=g)
    boxes = torch.tensor([[20.0, 30.0, 200.0, 180.0]], device="cuda")
    low_res, iou = graphed(features, None, None, boxes, True)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        expected_low, expected_iou = model.mask_decoder(
            image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)
    assert low_res.dtype == torch.float32
    error = ((low_res - expected_low).norm() / expected_low.norm()).item()
    assert 0 < error < 0.03, error  # bf16 indeed, and close
    assert torch.allclose(iou, expected_iou, atol=0.02)


@needs_cuda
def test_graphed_encoder_replays_equal_eager_after_memory_churn(test_student):
    from samlight.encoder_wrappers import GraphedEncoder

    encoder = copy.deepcopy(test_student.image_encoder).cuda().eval()
    graphed = GraphedEncoder(copy.deepcopy(encoder), dtype=torch.float32)
    size = encoder.img_size
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        x = torch.randn(1, 3, size, size, device="cuda", generator=g)
        actual = graphed(x)
        _churn(x)
        _churn(actual)
        with torch.inference_mode():
            expected = encoder(x)
        assert torch.allclose(actual, expected, atol=1e-3), step



def test_reduced_attention_equals_sams_attention(test_student):
    """The bulk decoder's cross attention (products and sums) computes SAM's attention."""
    from samlight.graphed_decoder import ReducedAttention

    attention = test_student.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    g = torch.Generator().manual_seed(2)
    tokens, image = torch.randn(3, 7, 256, generator=g), torch.randn(3, 64, 256, generator=g)
    with torch.no_grad():
        for q, kv in ((tokens, image), (image, tokens)):
            assert torch.allclose(ReducedAttention(attention)(q, kv, kv), attention(q, kv, kv), atol=1e-5)


def test_channels_last_mask_decoder_equals_sams(test_student):
    """The bulk decoder's channels-last upscaling (GEMMs, a last-dimension layer norm) computes SAM's masks."""
    from samlight.graphed_decoder import ChannelsLastMaskDecoder, embed_prompts

    model = test_student
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 256, *model.prompt_encoder.image_embedding_size, generator=g)
    coords, labels = torch.rand(5, 1, 2, generator=g) * 256, torch.ones(5, 1, dtype=torch.int)
    with torch.no_grad():
        sparse, dense = embed_prompts(model.prompt_encoder, coords, labels, None)
        args = (features, model.prompt_encoder.get_dense_pe(), sparse, dense)
        for multimask, shared in ((True, False), (False, False), (True, True)):
            expected = model.mask_decoder(*args, multimask_output=multimask)
            actual = ChannelsLastMaskDecoder(model.mask_decoder)(*args, multimask_output=multimask,
                                                                 shared_image=shared)
            for a, e in zip(actual, expected):
                assert a.shape == e.shape and torch.allclose(a, e, atol=1e-4), (a - e).abs().max()
        # shared image tokens with the bulk decoder's attention (which broadcasts them)
        from samlight.graphed_decoder import bulk_mask_decoder

        expected = model.mask_decoder(*args, multimask_output=True)
        actual = bulk_mask_decoder(model.mask_decoder)(*args, multimask_output=True, shared_image=True)
        for a, e in zip(actual, expected):
            assert torch.allclose(a, e, atol=1e-4), (a - e).abs().max()


@pytest.mark.slow
def test_compiled_grid_decoder_equals_the_eager_decoder_on_cpu(test_student, coco_val_images):
    """A grid batch of ``BULK_PROMPTS`` or more runs on the compiled decoder (fp32 on the CPU): the same logits,
    predicted IoUs and stability scores as the eager decoder and SAM's score."""
    import numpy as np
    from segment_anything.utils.amg import build_point_grid, calculate_stability_score

    from samlight.image_io import load_image
    from samlight.predictor import Predictor

    predictor = Predictor(copy.deepcopy(test_student), device="cpu")
    image = load_image(coco_val_images[0])
    embedding = predictor.embed(image)
    points = (build_point_grid(8) * np.array(image.shape[1::-1]))[:, None, :]
    assert len(points) >= Predictor.BULK_PROMPTS
    low_res, iou, stability = predictor.decode_grid(embedding, points)
    assert predictor._bulk_decoder is not None
    eager_low, eager_iou = predictor.decode(embedding, points, np.ones((len(points), 1), dtype=np.int64))
    assert torch.allclose(low_res, eager_low, atol=1e-3) and torch.allclose(iou, eager_iou, atol=1e-4)
    assert torch.allclose(stability, calculate_stability_score(eager_low, 0.0, 1.0), atol=1e-3)


@pytest.mark.parametrize("prompt", ["point", "points", "box", "boxes", "point and mask"])
def test_factored_click_decoder_equals_sams(test_student, coco_val_images, prompt):
    """The CPU click path (attention through the projections' factors, the first layer's image side kept per
    image, the upscaling in blocked pixel order) gives SAM's logits and IoUs on a COCO photo, every click."""
    import numpy as np

    from samlight.factored_decoder import FactoredMaskDecoder
    from samlight.image_io import load_image
    from samlight.predictor import Predictor

    model = copy.deepcopy(test_student).eval()
    predictor = Predictor(model, device="cpu")
    image = load_image(coco_val_images[1])
    features = predictor.embed(image).features
    size = model.image_encoder.img_size
    g = torch.Generator().manual_seed(4)
    coords = labels = boxes = masks = None
    if prompt.startswith("point"):
        count = 3 if prompt == "points" else 1
        coords, labels = torch.rand(1, count, 2, generator=g) * size, torch.tensor([[1, 0, 1][:count]])
    if prompt == "box":
        boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9]]) * size
    if prompt == "boxes":
        boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 0.3, 0.3], [0.5, 0.4, 1.0, 1.0]]) * size
    if prompt == "point and mask":
        masks = torch.randn(1, 1, *model.prompt_encoder.mask_input_size, generator=g) * 4
    decoder = FactoredMaskDecoder(model)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=(coords, labels) if coords is not None else None, boxes=boxes,
                                             masks=masks)
        for multimask in (True, False):
            expected = model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=multimask)
            for repeat in range(2):  # the second click on the image reuses its context
                actual = decoder(features, sparse, dense if masks is not None else None, multimask)
                for a, e in zip(actual, expected):  # random weights: logits of about +-0.3
                    assert a.shape == e.shape and torch.allclose(a, e, atol=1e-5), (a - e).abs().max()
    assert len(decoder._contexts) == (0 if masks is not None else 1)
    # and the predictor's CPU clicks go through it
    assert predictor.click_decoder is not None
    point = np.array([[image.shape[1] / 2, image.shape[0] / 2]])
    low_res, _ = predictor.decode(predictor.embed(image), point[None], np.array([[1]]))
    assert len(predictor.click_decoder._contexts) == 1 and low_res.shape[-1] == 4 * features.shape[-1]

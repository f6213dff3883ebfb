"""Masks in Label Studio's forms (clean-up, polygons, boxes), refinement memory, and a job's several objects."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from samlight.image_io import load_image
from samlight.predictor import Predictor
from serving import outputs
from serving.jobs import ObjectJob, OutputSpec, SegmentJob, execute
from serving.labelstudio import regions, rle_from_base64, rle_to_mask
from serving.refinement import MaskMemory, click_key


@pytest.fixture(scope="module")
def coco_masks(coco_tiny):
    api = COCO(str(coco_tiny / "annotations" / "instances_val2017.json"))
    anns = [a for a in api.loadAnns(api.getAnnIds(iscrowd=False)) if a["area"] > 500][:60]
    return [(api.annToMask(a).astype(bool), a["bbox"]) for a in anns]


def filled(polygon_sets, shape) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    for points in polygon_sets:
        cv2.fillPoly(canvas, [np.round(np.asarray(points) - 0.5).astype(np.int32)], 1)
    return canvas.astype(bool)


def iou(a, b) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


def test_polygons_and_boxes_of_real_object_masks(coco_masks):
    """On COCO's ground-truth masks: the polygons (holes dropped, specks below min_area dropped) cover the mask,
    and the tight box is the annotation's bbox."""
    ious = []
    for mask, (x, y, w, h) in coco_masks:
        parts = outputs.polygons(mask, tolerance=1.0, min_area=0, largest_only=False)
        assert all(len(p) >= 3 for p in parts)
        ious.append(iou(filled(parts, mask.shape), mask))
        x0, y0, x1, y1 = outputs.tight_box(mask)
        # the bbox is of COCO's polygon, the mask its rasterisation: within two pixels
        assert np.allclose([x0, y0, x1, y1], [x, y, x + w, y + h], atol=2)
        ys, xs = np.nonzero(mask)
        assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.median(ious) > 0.9 and min(ious) > 0.6, ious
    assert outputs.tight_box(np.zeros((4, 4), bool)) is None


def test_clean_up_fills_small_holes_removes_small_islands_and_keeps_the_largest():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 10:60] = True
    mask[30:33, 30:33] = False  # a 9-pixel hole
    mask[80:83, 80:83] = True  # a 9-pixel island
    mask[70:90, 10:30] = True  # a 400-pixel part
    cleaned = outputs.clean(mask, min_area=20, largest_only=False)
    assert cleaned[31, 31] and not cleaned[81, 81] and cleaned[80, 20]
    assert np.array_equal(outputs.clean(mask, min_area=0, largest_only=False), mask)
    largest = outputs.clean(mask, min_area=0, largest_only=True)
    assert largest[20, 20] and not largest[80, 20] and not largest[81, 81]
    # polygons: one per part above min_area, largest first, no holes; largest_only: one
    parts = outputs.polygons(mask, 1.0, min_area=100, largest_only=False)
    assert len(parts) == 2 and filled(parts[:1], mask.shape)[31, 31]
    assert len(outputs.polygons(mask, 1.0, min_area=0, largest_only=True)) == 1
    assert len(outputs.polygons(mask, 1.0, min_area=0, largest_only=False)) == 3


def test_clean_up_is_segment_anythings_remove_small_regions(coco_masks):
    """The linear-time clean-up gives what SAM's own post-processing gives (holes, then islands), on real
    object masks and on noise (a random-weight model's masks: thousands of specks)."""
    from segment_anything.utils.amg import remove_small_regions

    rng = np.random.default_rng(0)
    noise = [rng.random((96, 128)) < rng.uniform(0.2, 0.8) for _ in range(10)]
    framed = np.zeros((100, 100), bool)  # the box leaves a one-pixel frame: less background around it than
    framed[1:99, 1:99] = rng.random((98, 98)) < 0.9  # min_area=5000 (the whole image is labelled then)
    patch = np.zeros((100, 100), bool)  # specks near a corner and an edge
    patch[:30, :30] = rng.random((30, 30)) < 0.5
    patch[60:70, 95:] = True
    for mask in [m for m, _ in coco_masks[:20]] + noise + [framed, patch]:
        for min_area in (1, 8, 100, 5000):
            expected, _ = remove_small_regions(mask, min_area, mode="holes")
            expected, _ = remove_small_regions(expected, min_area, mode="islands")
            assert np.array_equal(outputs.clean(mask, min_area, largest_only=False), expected), min_area


def test_regions_are_label_studio_results():
    answer = {"polygons": [[[10.5, 20.5], [30.5, 20.5], [30.5, 40.5]]], "box": [10.0, 20.0, 30.0, 40.0]}
    [polygon] = regions("polygon", "poly", "image", 200, 100, answer, ["Car"], 0.8)
    assert polygon["type"] == "polygonlabels" and polygon["value"]["closed"] is True
    assert polygon["value"]["points"][0] == [5.25, 20.5] and polygon["value"]["polygonlabels"] == ["Car"]
    [box] = regions("box", "bbox", "image", 200, 100, answer, ["Car"], 0.8)
    assert box["value"] == {"x": 5.0, "y": 20.0, "width": 10.0, "height": 20.0, "rotation": 0,
                            "rectanglelabels": ["Car"]}
    assert regions("box", "bbox", "image", 200, 100, {"box": None}, ["Car"], 0.8) == []


def test_mask_memory_is_bounded():
    memory = MaskMemory(max_entries=2)
    for key in "abc":
        memory.put(key, key.upper())
    assert "a" not in memory and memory.get("b") == "B" and memory.get("c") == "C"
    assert memory.get(None) is None and memory.stats() == {"entries": 2, "refined": 2}
    assert click_key("img", ["k:1"]) != click_key("img", ["k:1", "k:2"]) != click_key("other", ["k:1", "k:2"])


class LocalImages:
    def __init__(self, path):
        self.image = load_image(path)

    def fetch(self, url):
        return self.image


def test_job_refines_the_previous_click_and_batches_rectangles(test_student, coco_val_images):
    predictor = Predictor(copy.deepcopy(test_student), device="cpu")
    images = LocalImages(coco_val_images[0])
    height, width = images.image.shape[:2]
    memory = MaskMemory()
    first = SegmentJob("u", "img", [ObjectJob(points=[[200.0, 150.0]], point_labels=[1], key="one")])
    answer = execute(first, predictor, images, memory=memory)["objects"][0]
    assert answer["refined"] is False and "one" in memory
    second = ObjectJob(points=[[200.0, 150.0], [260.0, 170.0]], point_labels=[1, 0], key="two", refine="one")
    refined = execute(SegmentJob("u", "img", [second]), predictor, images, memory=memory)["objects"][0]
    fresh = execute(SegmentJob("u", "img", [ObjectJob(points=second.points, point_labels=second.point_labels)]),
                    predictor, images)["objects"][0]
    assert refined["refined"] is True and fresh["refined"] is False
    # the previous logits went in as SAM's mask_input
    embedding = predictor.cache.get("img")
    _, _, logits = predictor.predict_best(embedding, np.array([[[200.0, 150.0]]]), np.array([[1]]))
    reference = predictor.predict_embedding(embedding, np.array(second.points), np.array([1, 0]),
                                            mask_input=logits[0].numpy()[None], multimask_output=False)
    assert np.array_equal(rle_to_mask(rle_from_base64(refined["rle_base64"]), height, width) > 0,
                          reference.masks[0])
    # three rectangles in one job, every output; one answered before is skipped
    boxes = [[10.0, 10.0, 200.0, 200.0], [300.0, 100.0, 500.0, 300.0], [50.0, 250.0, 250.0, 400.0]]
    job = SegmentJob("u", "img", [ObjectJob(box=b, key=f"box{i}", skip_answered=True) for i, b in enumerate(boxes)],
                     output=OutputSpec(polygon=True, box=True, min_area=50))
    memory.put("box1", logits[0])
    result = execute(job, predictor, images, memory=memory)
    assert [sorted(o) for o in result["objects"]] == [
        ["area", "box", "polygons", "refined", "rle_base64", "score"], ["skipped"],
        ["area", "box", "polygons", "refined", "rle_base64", "score"]]
    for item in (result["objects"][0], result["objects"][2]):
        mask = rle_to_mask(rle_from_base64(item["rle_base64"]), height, width) > 0
        assert item["area"] == mask.sum() and item["box"] == outputs.tight_box(mask)
        assert outputs.clean(mask, 50, False).sum() == mask.sum()  # already clean
    assert set(result["timings_ms"]) >= {"mask", "outputs"}


def test_automatic_masks_filter_and_suppress(test_student, coco_val_images):
    """SAM's automatic mask generation on a cached embedding: the thresholds filter, box NMS suppresses, the
    masks come best first. (Random weights: predicted IoUs near 0 and masks of noise, hence thresholds of 0.)"""
    from serving.automatic import AutoSpec, automatic_masks

    predictor = Predictor(copy.deepcopy(test_student), device="cpu")
    embedding = predictor.embed(load_image(coco_val_images[0]))
    every = automatic_masks(predictor, embedding, AutoSpec(points_per_side=4, pred_iou=0, stability=0, box_nms=1.0))
    suppressed = automatic_masks(predictor, embedding, AutoSpec(points_per_side=4, pred_iou=0, stability=0))
    assert 1 <= len(suppressed) < len(every) <= 48
    scores = [score for _, score in every]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0
    assert all(mask.shape == embedding.original_size and mask.any() for mask, _ in every)
    assert automatic_masks(predictor, embedding, AutoSpec(points_per_side=4, pred_iou=0.99)) == []


def test_automatic_masks_over_crops(test_student, coco_val_images):
    """Crop layers (small objects): each crop is embedded from the picture and gridded; its masks come back at
    the image's size; the picture is asked for only when crops are on."""
    from serving.automatic import AutoSpec, automatic_masks

    predictor = Predictor(copy.deepcopy(test_student), device="cpu")
    image = load_image(coco_val_images[0])
    embedding = predictor.embed(image)
    asked = []

    def picture():
        asked.append(1)
        return image

    spec = AutoSpec(points_per_side=4, pred_iou=0, stability=0)
    whole = automatic_masks(predictor, embedding, spec, image=picture)
    assert not asked
    cropped = automatic_masks(predictor, embedding, AutoSpec(points_per_side=4, pred_iou=0, stability=0,
                                                             crop_layers=1), image=picture)
    assert asked == [1] and len(cropped) >= len(whole) >= 1
    assert all(mask.shape == embedding.original_size and mask.any() for mask, _ in cropped)
    assert len(predictor.cache) >= 5  # the image and its four crops were embedded

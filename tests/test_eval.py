"""samlight eval: COCO harness baselines, click simulation, fidelity, CLI outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samlight.cli import main
from samlight.distill import TrainingSample, coco_dataset
from samlight.eval import evaluate_samples, fidelity
from samlight.eval.clicks import distance_to_boundary, farthest_point, next_click
from samlight.eval.protocol import filled_box, size_class
from samlight.predictor import Predictor


@pytest.fixture(scope="module")
def val_annotations(coco_tiny):
    return coco_tiny / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def val_samples(val_annotations):
    return coco_dataset(val_annotations)


def test_box_baseline_gives_0590_over_804_instances(val_samples):
    result = evaluate_samples("box", val_samples)
    assert result["instances"] == 804
    assert result["images"] == 80
    assert round(result["miou"], 3) == 0.590
    sizes = result["by_size"]
    assert sum(part["instances"] for part in sizes.values()) == 804
    assert all(0.4 < part["miou"] < 0.8 for part in sizes.values())


def test_oracle_baseline_is_perfect_through_the_cli(val_annotations, tmp_path, capsys):
    out = tmp_path / "oracle.json"
    argv = ["eval", "--baseline", "oracle", "--coco", str(val_annotations), "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["miou"] == 1.0 and result["instances"] == 804
    assert "mIoU" in capsys.readouterr().out


def test_exact_euclidean_distance_and_first_click():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) > 0.35
    distance = distance_to_boundary(mask)
    # brute force: distance to the nearest background pixel, the ring outside the image included
    padded = np.pad(mask, 1)
    bg = np.argwhere(~padded)
    for y, x in [(3, 4), (10, 20), (22, 30), (0, 0)]:
        expected = np.sqrt(((bg - (y + 1, x + 1)) ** 2).sum(1)).min() if mask[y, x] else 0.0
        assert distance[y, x] == pytest.approx(expected, abs=1e-3)
    box = np.zeros((40, 60), bool)
    box[10:31, 5:26] = True  # 21 x 21 square: centre pixel (15, 20)
    assert farthest_point(box).tolist() == [15.5, 20.5]
    assert farthest_point(np.zeros((5, 5), bool)) is None


def test_corrective_clicks_positive_for_misses_negative_for_false_positives():
    truth = np.zeros((50, 50), bool)
    truth[10:30, 10:30] = True
    missed = truth.copy()
    missed[10:30, 10:18] = False  # a 20 x 8 strip missed
    point, label = next_click(missed, truth)
    assert label == 1 and truth[int(point[1]), int(point[0])] and not missed[int(point[1]), int(point[0])]
    extra = truth.copy()
    extra[35:48, 30:48] = True  # a large false positive, plus a small miss
    extra[10:12, 10:12] = False
    point, label = next_click(extra, truth)
    assert label == 0 and not truth[int(point[1]), int(point[0])]
    assert next_click(truth, truth) is None


def test_size_classes_and_filled_box():
    assert [size_class(a) for a in (32**2 - 1, 32**2, 96**2 - 1, 96**2)] == ["small", "medium", "medium", "large"]
    mask = filled_box(np.array([1.4, 2.6, 4.5, 5.0]), (8, 8))
    assert mask.sum() == (5 - 3) * (4 - 1)


def test_point_protocol_and_programmatic_samples(test_student):
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    image = np.full((120, 160, 3), 40, np.uint8)
    image[mask] = (220, 180, 30)
    samples = [TrainingSample(image=image, masks=[mask, ~mask])]
    result = evaluate_samples(test_student, samples, prompt="point", clicks=3, device="cpu", keep_examples=1)
    assert result["instances"] == 2 and result["images"] == 1
    assert len(result["per_click_miou"]) == 3 and result["miou"] == result["per_click_miou"][-1]
    example = result["examples"][0]
    # first click at the centre of each region, later clicks follow the errors
    assert 1 <= len(example.points[0]) <= 3 and example.labels[0][0] == 1
    assert mask[int(example.points[0][0][1]), int(example.points[0][0][0])]
    assert result["chained"] is True
    boxes = evaluate_samples(test_student, samples, prompt="box", device="cpu")
    assert boxes["instances"] == 2 and 0.0 <= boxes["miou"] <= 1.0
    assert evaluate_samples("oracle", samples)["miou"] == 1.0


def test_chained_clicks_feed_the_previous_mask_and_fidelity_follows_the_same_clicks(test_student, test_teacher,
                                                                                    val_annotations):
    """Chained: each click after the first gets the previous low-res logits (a different answer than decoding
    the clicks afresh); the first click is the same either way. Fidelity per click: a model followed by itself
    is perfect, by another model is not."""
    samples = coco_dataset(val_annotations, val_annotations.parents[1] / "val2017", max_images=2)
    predictor = Predictor(test_student, device="cpu")
    chained = evaluate_samples(test_student, samples, "point", 3, predictor=predictor,
                               teacher_predictor=Predictor(test_student, device="cpu"))
    fresh = evaluate_samples(test_student, samples, "point", 3, predictor=predictor, chained=False)
    assert chained["per_click_miou"][0] == fresh["per_click_miou"][0]
    assert chained["per_click_miou"][1:] != fresh["per_click_miou"][1:]
    assert chained["per_click_fidelity"] == [1.0, 1.0, 1.0] and "per_click_fidelity" not in fresh
    other = evaluate_samples(test_student, samples, "point", 3, predictor=predictor,
                             teacher_predictor=Predictor(test_teacher, device="cpu"))
    assert len(other["per_click_fidelity"]) == 3 and max(other["per_click_fidelity"]) < 1.0


def test_fidelity_of_a_model_to_itself_is_perfect(test_student, coco_val_images):
    samples = [TrainingSample(image=p) for p in coco_val_images[:2]]  # no GT: prompted by a grid of clicks
    result = fidelity(test_student, test_student, samples, device="cpu")
    assert result["mask_iou"] == 1.0 and result["prompts"] == 32
    assert result["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["embedding_rel_mse"] == pytest.approx(0.0, abs=1e-8)


def test_cli_model_eval_writes_table_json_and_grid(val_annotations, tmp_path, capsys):
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    code = main(["eval", "--random", "lightening_test", "--coco", str(val_annotations), "--max-images", "2",
                 "--prompt", "point", "--clicks", "2", "--teacher", "random:vit_test", "--json", str(out),
                 "--grid", str(grid), "--examples", "2", "--device", "cpu", "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["clicks"] == 2 and len(result["per_click_miou"]) == 2
    assert result["fidelity"]["teacher"] == "random:vit_test:0" and result["fidelity"]["prompts"] == result["instances"]
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mask IoU vs teacher" in capsys.readouterr().out


def test_cli_click_curve_both_ways(val_annotations, tmp_path, capsys):
    out, curve = tmp_path / "r.json", tmp_path / "curve.png"
    code = main(["eval", "--random", "lightening_test", "--coco", str(val_annotations), "--max-images", "2",
                 "--prompt", "point", "--clicks", "3", "--teacher", "random:vit_test", "--json", str(out),
                 "--curve", str(curve), "--device", "cpu", "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["chained"] is True and result["other_mode"]["chained"] is False
    assert len(result["per_click_fidelity"]) == len(result["other_mode"]["per_click_fidelity"]) == 3
    # fidelity under the prompt evaluated: the last click's, not a box prompt's
    assert result["fidelity"]["mask_iou"] == result["per_click_fidelity"][-1]
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mIoU per click (chained)" in printed and "mIoU per click (not chained)" in printed


@pytest.mark.slow
def test_cli_eval_at_int8_reports_agreement_with_fp32(val_annotations, tmp_path, capsys):
    from samlight.modeling.int8_linear import available

    if not available():
        pytest.skip("needs oneDNN's int8 GEMM")
    out = tmp_path / "r.json"
    code = main(["eval", "--random", "lightening_test", "--coco", str(val_annotations), "--max-images", "2",
                 "--precision", "int8", "--json", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["precision"] == "int8" and result["vs_fp32"]["prompts"] == result["instances"]
    # close to the float model, and not trivially identical to it
    assert 0.99 < result["vs_fp32"]["embedding_cosine"] < 1.0
    assert "mask IoU int8 vs fp32" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "box", "--coco", "/nonexistent/instances_val2017.json"], "does not exist"),
    (["--baseline", "box", "--coco", "{ann}", "--precision", "int8"], "--precision"),
    (["--baseline", "box", "--coco", "{ann}", "--clicks", "0"], "--clicks"),
    (["--baseline", "box", "--coco", "{ann}", "--teacher", "random:vit_test"], "baseline"),
])
def test_cli_errors_are_clean(argv, message, val_annotations, capsys):
    argv = [a.replace("{ann}", str(val_annotations)) for a in argv]
    assert main(["eval", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err

"""The backend over HTTP (Flask test client): protocol, prompts -> masks, batch, webhooks, auth, errors.

Most tests use the test-only geometry model (a box answers with that box, a point with a disc around it), so
they can check where each mask lands; ``test_real_model_*`` run a seeded random ``lightening_test``.
"""

import base64
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from serving.corrections import FileCorrectionSink
from serving.config import EmbeddedSettings, FetchSettings, Settings
from serving.labels import SMART_CONFIG
from serving.labelstudio import brush_regions, rle_to_mask
from serving.source import ModelSource
from backend.settings import BackendSettings
from serving.testing import point_radius
from e2e.servers import ImageHost
from serving.options import ProjectOptions

DEFAULTS = ProjectOptions().to_dict()

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def host(coco_tiny):
    with ImageHost(coco_tiny / "val2017") as server:
        yield server


@pytest.fixture(scope="module")
def photo(coco_val_images):
    path = coco_val_images[1]
    width, height = Image.open(path).size
    return {"name": path.name, "url": f"/data/upload/{path.name}", "width": width, "height": height}


def make_app(host, model_dir, source: ModelSource, **options):
    settings = BackendSettings(Settings(model_dir=model_dir, model=source, fetch=FetchSettings(
        label_studio_url=host.url, api_key=host.legacy_token)), preload=False, **options)
    return create_app(settings)


@pytest.fixture(scope="module")
def app(host, tmp_path_factory):
    return make_app(host, tmp_path_factory.mktemp("models"), ModelSource(test_model="geometry"))


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def keypoint(x, y, photo, positive=None, label="Object"):
    item = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels",
            "original_width": photo["width"], "original_height": photo["height"], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]}}
    if positive is not None:
        item["is_positive"] = positive
    return item


def rectangle(x, y, w, h, photo, label="Object"):
    return {"id": "r", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "original_width": photo["width"], "original_height": photo["height"], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def predict_body(photo, context, tasks=None, config=SMART_CONFIG):
    tasks = tasks or [{"id": 7, "data": {"image": photo["url"]}}]
    return {"tasks": tasks, "project": "1.1700000000", "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


def only_region(response, photo):
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 1 and len(results[0]["result"]) == 1
    region = results[0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    assert (region["from_name"], region["to_name"]) == ("mask", "image")
    assert (region["original_width"], region["original_height"]) == (photo["width"], photo["height"])
    assert results[0]["model_version"] and isinstance(results[0]["score"], float)
    return region, rle_to_mask(region["value"]["rle"], photo["height"], photo["width"]) > 0


def disc(photo, x, y):
    yy, xx = np.mgrid[:photo["height"], :photo["width"]] + 0.5
    return (xx - x) ** 2 + (yy - y) ** 2 <= point_radius(photo["height"], photo["width"]) ** 2


# --- protocol ---------------------------------------------------------------------------------------

def test_health_and_versions(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["model_version"] == "test-geometry"
    assert client.get("/").status_code == 200
    assert client.get("/versions").get_json()["versions"] == ["test-geometry"]


def test_setup_is_cheap_and_validates(host, tmp_path):
    app = make_app(host, tmp_path, ModelSource(random="lightening_t"))
    client = app.test_client()
    response = client.post("/setup", json={"project": "1.1", "schema": SMART_CONFIG, "hostname": host.url,
                                           "access_token": "x", "extra_params": None})
    assert response.status_code == 200
    assert response.get_json() == {"model_version": "random-lightening_t-0", "model_role": "student",
                                   "options": DEFAULTS}
    teacher = make_app(host, tmp_path / "teacher", ModelSource(random="vit_test")).test_client()
    assert teacher.post("/setup", json={"schema": SMART_CONFIG}).get_json()["model_role"] == "teacher"
    assert teacher.get("/versions").get_json()["model_role"] == "teacher"
    assert not app.extensions["samlight"].segmenter.loaded  # /setup never loads the model
    keypoints_only = ('<View><Image name="i" value="$i"/>'
                      '<KeyPointLabels name="k" toName="i"><Label value="a"/></KeyPointLabels></View>')
    no_brush = client.post("/setup", json={"schema": keypoints_only})
    assert no_brush.status_code == 400 and "BrushLabels" in no_brush.get_json()["error"]
    assert client.post("/setup", json={}).status_code == 400


@pytest.mark.parametrize("extra_params, options", [
    (None, DEFAULTS),
    ("", DEFAULTS),  # Label Studio's Connect Model form with the box left empty
    ("  {}  ", DEFAULTS),
    ("null", DEFAULTS),
    ('{"min_score": 0.5, "prewarm": false}', {**DEFAULTS, "prewarm": False, "min_score": 0.5}),
    ({"min_score": 1}, {**DEFAULTS, "min_score": 1.0}),
    ('{"outputs": ["brush", "box"], "min_area": 0, "largest_only": true, "polygon_tolerance": 2.5, "refine": false}',
     {**DEFAULTS, "outputs": ["brush", "box"], "min_area": 0, "largest_only": True, "polygon_tolerance": 2.5,
      "refine": False}),
    ('{"outputs": "mask, polygon"}', {**DEFAULTS, "outputs": ["mask", "polygon"]}),  # a control name, a kind
])
def test_setup_accepts_extra_params_as_label_studio_sends_them(client, extra_params, options):
    response = client.post("/setup", json={"project": "4.17", "schema": SMART_CONFIG, "extra_params": extra_params})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["options"] == options


@pytest.mark.parametrize("extra_params, words", [
    ("{min_score: 1}", ["extra_params", "not valid JSON", "line 1 column 2"]),
    ("[1]", ["extra_params", "must be a JSON object", "list"]),
    ([1], ["extra_params", "must be a JSON object"]),
    ('"text"', ["extra_params", "must be a JSON object", "str"]),
    ('{"min_scor": 0.5}', ["unknown option", "min_scor", "min_score"]),
    ('{"min_score": 2}', ["extra_params.min_score", "from 0 to 1"]),
    ('{"prewarm": "yes"}', ["extra_params.prewarm", "true or false"]),
    ('{"min_area": -5}', ["extra_params.min_area", "integer from 0"]),
    ('{"min_area": 2.5}', ["extra_params.min_area", "integer"]),
    ('{"polygon_tolerance": "fine"}', ["extra_params.polygon_tolerance", "number from 0 to 100"]),
    ('{"outputs": [1]}', ["extra_params.outputs", "brush, polygon, box"]),
    ('{"largest_only": 1}', ["extra_params.largest_only", "true or false"]),
    ('{"outputs": ["polygon"]}', ["outputs option", "matches none", "mask (brush)"]),  # the config has a brush only
])
def test_bad_extra_params_get_a_400_naming_the_problem(client, extra_params, words):
    response = client.post("/setup", json={"project": "4.17", "schema": SMART_CONFIG, "extra_params": extra_params})
    assert response.status_code == 400
    message = response.get_json()["error"]
    assert all(word in message for word in words), message


def test_project_options_reach_the_prediction_path(host, tmp_path, photo, coco_val_images):
    app = make_app(host, tmp_path, ModelSource(test_model="geometry"))
    client = app.test_client()
    services = app.extensions["samlight"]
    first = {"tasks": [{"id": 1, "data": {"image": f"/data/upload/{coco_val_images[6].name}"}}],
             "project": "5.100", "label_config": SMART_CONFIG, "params": {"context": None}}
    # prewarm off for project 5: opening a task computes nothing
    assert client.post("/setup", json={"project": "5.100", "schema": SMART_CONFIG,
                                       "extra_params": '{"prewarm": false, "min_score": 0.99}'}).status_code == 200
    assert client.post("/predict", json=first).get_json()["results"] == [[]]
    time.sleep(0.5)
    assert not services.segmenter.predictor().is_cached(services.fetcher.image_key(first["tasks"][0]["data"]["image"]))
    # min_score 0.99: the geometry model's masks score 0.9, so no suggestion; a process with the same
    # MODEL_DIR (another gunicorn worker, or after a restart) reads the same options
    other = make_app(host, tmp_path, ModelSource(test_model="geometry")).test_client()
    body = {**predict_body(photo, {"result": [keypoint(30, 30, photo)]}), "project": "5.100"}
    for c in (client, other):
        answer = c.post("/predict", json=body).get_json()["results"][0]
        assert answer["result"] == [] and 0 <= answer["score"] < 0.99
    # a project without options gets the defaults
    answer = other.post("/predict", json={**body, "project": "6.100"}).get_json()["results"][0]
    assert len(answer["result"]) == 1


# --- interactive prompts ------------------------------------------------------------------------------

def test_keypoint_gives_mask_at_the_point(client, photo):
    region, mask = only_region(client.post("/predict", json=predict_body(photo, {"result": [
        keypoint(25.0, 40.0, photo)]})), photo)
    assert region["value"]["brushlabels"] == ["Object"]
    assert np.array_equal(mask, disc(photo, 0.25 * photo["width"], 0.40 * photo["height"]))


def test_several_points_with_a_negative_one(client, photo):
    w, h = photo["width"], photo["height"]
    context = {"result": [keypoint(50, 50, photo, positive=True), keypoint(52, 50, photo, positive=False),
                          keypoint(10, 10, photo)]}  # is_positive missing: positive
    _, mask = only_region(client.post("/predict", json=predict_body(photo, context)), photo)
    expected = (disc(photo, 0.5 * w, 0.5 * h) | disc(photo, 0.1 * w, 0.1 * h)) & ~disc(photo, 0.52 * w, 0.5 * h)
    assert np.array_equal(mask, expected)


def rectangle_mask(photo, x, y, w, h):
    mask = np.zeros((photo["height"], photo["width"]), bool)
    x0, y0 = round(x * photo["width"] / 100), round(y * photo["height"] / 100)
    x1, y1 = round((x + w) * photo["width"] / 100), round((y + h) * photo["height"] / 100)
    mask[y0:y1, x0:x1] = True
    return mask


def masks_of(response, photo) -> list[np.ndarray]:
    assert response.status_code == 200, response.get_json()
    return [rle_to_mask(r["value"]["rle"], photo["height"], photo["width"]) > 0
            for r in response.get_json()["results"][0]["result"]]


def iou(a, b) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


def test_rectangle_gives_its_box(client, photo):
    context = {"result": [rectangle(20.0, 30.0, 40.0, 25.0, photo, "Cat")]}
    region, mask = only_region(client.post("/predict", json=predict_body(photo, context)), photo)
    assert region["value"]["brushlabels"] == ["Object"]  # "Cat" is not a brush label: the first one
    assert iou(mask, rectangle_mask(photo, 20, 30, 40, 25)) > 0.99


def test_several_rectangles_get_one_region_each_and_answered_ones_are_skipped(client, photo):
    boxes = {"a": (5, 5, 10, 10), "b": (20, 30, 40, 25), "c": (70, 60, 20, 30)}

    def context(*names):
        return {"result": [dict(rectangle(*boxes[n], photo), id=n) for n in names]}

    masks = masks_of(client.post("/predict", json=predict_body(photo, context("a", "b"))), photo)
    assert [iou(m, rectangle_mask(photo, *boxes[n])) > 0.99 for m, n in zip(masks, "ab")] == [True, True]
    # newer Label Studio versions send every rectangle with each call: only the new one is answered
    masks = masks_of(client.post("/predict", json=predict_body(photo, context("a", "b", "c"))), photo)
    assert len(masks) == 1 and iou(masks[0], rectangle_mask(photo, *boxes["c"])) > 0.99
    # one rectangle alone is always answered (Label Studio 1.23.2 sends the current one; a retry)
    assert len(masks_of(client.post("/predict", json=predict_body(photo, context("a"))), photo)) == 1


TARGETS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <PolygonLabels name="outline" toName="image"><Label value="Object"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Object"/></RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object" smart="true"/></RectangleLabels>
</View>"""


def polygon_mask(points, photo) -> np.ndarray:
    import cv2

    mask = np.zeros((photo["height"], photo["width"]), np.uint8)
    pixels = np.array([[x * photo["width"] / 100, y * photo["height"] / 100] for x, y in points])
    cv2.fillPoly(mask, [np.round(pixels - 0.5).astype(np.int32)], 1)
    return mask.astype(bool)


def test_every_target_gets_the_mask_in_its_form(client, photo):
    w, h = photo["width"], photo["height"]
    body = predict_body(photo, {"result": [keypoint(40, 50, photo)]}, config=TARGETS_CONFIG)
    regions = {r["from_name"]: r for r in client.post("/predict", json=body).get_json()["results"][0]["result"]}
    assert sorted(regions) == ["bbox", "mask", "outline"]
    expected = disc(photo, 0.4 * w, 0.5 * h)
    brush = rle_to_mask(regions["mask"]["value"]["rle"], h, w) > 0
    assert np.array_equal(brush, expected)
    polygon = regions["outline"]
    assert polygon["type"] == "polygonlabels" and polygon["value"]["closed"] is True
    assert polygon["value"]["polygonlabels"] == ["Object"] and iou(polygon_mask(polygon["value"]["points"], photo),
                                                                     expected) > 0.95
    box = regions["bbox"]["value"]
    ys, xs = np.nonzero(expected)
    assert regions["bbox"]["type"] == "rectanglelabels" and box["rectanglelabels"] == ["Object"]
    assert [box["x"] * w / 100, box["y"] * h / 100, (box["x"] + box["width"]) * w / 100,
            (box["y"] + box["height"]) * h / 100] == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # the outputs option picks targets, by kind or by control name
    for outputs, names in (('["polygon"]', ["outline"]), ('["bbox", "brush"]', ["bbox", "mask"])):
        answer = client.post("/predict", json={**body, "extra_params": f'{{"outputs": {outputs}}}'}).get_json()
        assert sorted(r["from_name"] for r in answer["results"][0]["result"]) == names
    response = client.post("/predict", json={**body, "extra_params": '{"outputs": ["mesh"]}'})
    assert response.status_code == 400 and "matches none" in response.get_json()["error"]


def test_automatic_masks_pre_annotate_a_batch(host, tmp_path, photo, coco_val_images):
    """auto_annotate: a batch call (a task opened, Retrieve Predictions) gets masks for the whole image in every
    target's form, with the configured label; a failing image gets none."""
    client = make_app(host, tmp_path, ModelSource(random="lightening_test")).test_client()
    names = [p.name for p in coco_val_images[:5]]
    tasks = [{"id": i, "data": {"image": f"/data/upload/{name}"}} for i, name in enumerate(names)]
    tasks[1]["data"]["image"] = "/data/upload/missing.jpg"
    options = {"auto_annotate": True, "auto_label": "Object", "auto_points_per_side": 4, "auto_pred_iou": 0,
               "auto_stability": 0, "min_area": 0}  # random weights: scores near 0
    body = {"tasks": tasks, "label_config": TARGETS_CONFIG, "params": {"context": None}, "extra_params": options}
    results = client.post("/predict", json=body).get_json()["results"]
    assert len(results) == 5 and results[1] == []
    for prediction in (results[0], results[2], results[3], results[4]):
        kinds = {r["type"] for r in prediction["result"]}
        assert kinds == {"brushlabels", "polygonlabels", "rectanglelabels"}, kinds
        assert all(r["value"][r["type"]] == ["Object"] for r in prediction["result"])
        assert 0 <= prediction["score"] <= 1 and prediction["model_version"] == "random-lightening_test-0"
    strict = {**body, "tasks": tasks[:1], "extra_params": {**options, "auto_pred_iou": 1}}
    assert client.post("/predict", json=strict).get_json()["results"][0]["result"] == []


def test_a_batch_past_the_inline_budget_is_finished_in_the_background(host, tmp_path, coco_val_images):
    """What the inline budget leaves is queued on disk and posted to Label Studio's API by the backend's
    background thread, under the model version; a task that already has one of that version is skipped, and a
    failing image is kept as failed with its error in /health."""
    app = make_app(host, tmp_path, ModelSource(random="lightening_test"), auto_inline_s=0)
    client = app.test_client()
    names = [p.name for p in coco_val_images[:6]]
    tasks = [{"id": 100 + i, "data": {"image": f"/data/upload/{name}"}} for i, name in enumerate(names)]
    tasks[2]["data"]["image"] = "/data/upload/missing.jpg"
    host.predictions.append({"task": 105, "result": [], "model_version": "random-lightening_test-0"})
    options = {"auto_annotate": True, "auto_label": "Object", "auto_points_per_side": 4, "auto_pred_iou": 0,
               "auto_stability": 0, "min_area": 0}
    body = {"tasks": tasks, "label_config": TARGETS_CONFIG, "extra_params": options}
    assert client.post("/predict", json=body).get_json()["results"] == [[]] * 6  # nothing inline
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get("/health").get_json()["preannotation"]
        if progress.get("posted", 0) + progress.get("skipped", 0) + progress.get("failed", 0) == 6:
            break
        time.sleep(0.2)
    assert progress["submitted"] == 6 and progress["posted"] == 4 and progress["skipped"] == 1, progress
    assert progress["failed"] == 1 and progress["failed_tasks"] == 1 and "missing.jpg" in progress["last_error"]
    assert progress["queued"] == progress["running"] == 0
    posted = {p["task"]: p for p in host.predictions[1:]}
    assert sorted(posted) == [100, 101, 103, 104]
    for prediction in posted.values():
        assert prediction["model_version"] == "random-lightening_test-0" and 0 <= prediction["score"] <= 1
        assert {r["type"] for r in prediction["result"]} == {"brushlabels", "polygonlabels", "rectanglelabels"}
    assert all(h["Authorization"] == f"Token {host.legacy_token}" for m, path, h in host.requests
               if path.startswith("/api/predictions/"))


def test_polygon_only_project(client, photo):
    config = ('<View><Image name="image" value="$image"/>'
              '<PolygonLabels name="poly" toName="image"><Label value="Car"/><Label value="Object"/></PolygonLabels>'
              '<RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>'
              '</View>')
    body = predict_body(photo, {"result": [rectangle(20, 30, 40, 25, photo)]}, config=config)
    [region] = client.post("/predict", json=body).get_json()["results"][0]["result"]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Object"]
    assert len(region["value"]["points"]) == 4  # a box's outline simplifies to its corners
    assert iou(polygon_mask(region["value"]["points"], photo), rectangle_mask(photo, 20, 30, 40, 25)) > 0.98


def test_clean_up_fills_holes_and_keeps_the_largest_part(client, photo):
    w, h = photo["width"], photo["height"]
    # a box with a negative click inside: a hole of one disc's area
    context = {"result": [rectangle(20, 20, 50, 50, photo), keypoint(40, 40, photo, positive=False)]}
    hole = disc(photo, 0.4 * w, 0.4 * h).sum()
    for min_area, filled in ((0, False), (int(hole) + 1, True)):
        body = {**predict_body(photo, context), "extra_params": {"min_area": min_area}}
        [mask] = masks_of(client.post("/predict", json=body), photo)
        assert bool(mask[int(0.4 * h), int(0.4 * w)]) is filled
    # two positive clicks, one cut smaller by a negative one: largest_only keeps the bigger disc
    context = {"result": [keypoint(20, 20, photo), keypoint(70, 70, photo), keypoint(72, 70, photo, positive=False)]}
    body = {**predict_body(photo, context), "extra_params": {"largest_only": True}}
    [mask] = masks_of(client.post("/predict", json=body), photo)
    assert np.array_equal(mask, disc(photo, 0.2 * w, 0.2 * h))
    # polygons: one per part (largest first), holes dropped
    body = {**predict_body(photo, context, config=TARGETS_CONFIG), "extra_params": {"outputs": ["polygon"]}}
    regions = client.post("/predict", json=body).get_json()["results"][0]["result"]
    assert len(regions) == 2 and iou(polygon_mask(regions[0]["value"]["points"], photo),
                                     disc(photo, 0.2 * w, 0.2 * h)) > 0.95


def test_a_click_that_extends_a_region_refines_it(client, photo):
    segmenter = client.application.extensions["samlight"].segmenter

    def refined() -> int:
        return client.get("/health").get_json()["refinement"]["refined"]

    first, second, other = (dict(keypoint(x, 40, photo), id=i) for x, i in ((30, "p1"), (35, "p2"), (60, "p3")))
    client.post("/predict", json=predict_body(photo, {"result": [first]}))
    before = refined()
    client.post("/predict", json=predict_body(photo, {"result": [first, second]}))
    assert refined() == before + 1  # the same region, one more click: refined
    client.post("/predict", json=predict_body(photo, {"result": [other]}))
    client.post("/predict", json=predict_body(photo, {"result": [dict(other, id="p4"), second]}))
    assert refined() == before + 1  # a new region is not
    client.post("/predict", json={**predict_body(photo, {"result": [first, second, dict(other, id="p5")]}),
                                  "extra_params": {"refine": False}})
    assert refined() == before + 1 and segmenter.memory.stats()["entries"] >= 4
    # a box, then a click inside it: the box's mask is refined
    box = dict(rectangle(20, 20, 50, 50, photo), id="b1")
    client.post("/predict", json=predict_body(photo, {"result": [box]}))
    client.post("/predict", json=predict_body(photo, {"result": [box, dict(keypoint(40, 40, photo), id="p6")]}))
    assert refined() == before + 2


def test_output_label_follows_the_prompt(client, photo):
    config = SMART_CONFIG.replace('<Label value="Object" background="#FF0000"/>',
                                  '<Label value="Object" background="#FF0000"/><Label value="Dog"/>')
    config = config.replace('<Label value="Object" smart="true" background="#00FF00" showInline="true"/>',
                            '<Label value="Dog" smart="true"/>')
    body = predict_body(photo, {"result": [keypoint(30, 30, photo, label="Dog")]}, config=config)
    region, _ = only_region(client.post("/predict", json=body), photo)
    assert region["value"]["brushlabels"] == ["Dog"]


# --- batch ---------------------------------------------------------------------------------------------

def test_batch_stores_no_prediction_and_prewarms(app, client, photo, coco_val_images):
    names = [p.name for p in coco_val_images[2:5]]
    tasks = [{"id": i, "data": {"image": f"/data/upload/{name}"}} for i, name in enumerate(names)]
    tasks.append({"id": 9, "data": {"image": "/data/upload/missing.jpg"}})  # still answered
    response = client.post("/predict", json=predict_body(photo, None, tasks=tasks))
    assert response.status_code == 200
    # an empty list of predictions per task: Label Studio stores nothing and asks again on the next open
    assert response.get_json()["results"] == [[]] * len(tasks)
    assert response.get_json()["model_version"] == "test-geometry"
    services = app.extensions["samlight"]
    keys = [services.fetcher.image_key(f"/data/upload/{name}") for name in names]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(services.segmenter.predictor().is_cached(k) for k in keys):
        time.sleep(0.05)
    assert all(services.segmenter.predictor().is_cached(k) for k in keys)


# --- errors ----------------------------------------------------------------------------------------------

def test_bad_requests_get_400_with_a_message(client, photo):
    cases = [
        client.post("/predict", data="{not json", content_type="application/json"),
        client.post("/predict", json=[1, 2]),
        client.post("/predict", json={"label_config": SMART_CONFIG}),
        client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": photo["url"]}}]}),
        client.post("/predict", json=predict_body(photo, None, tasks=[{"id": 1, "data": {"img": "x"}}])),
        client.post("/predict", json=predict_body(photo, None, tasks=["nope"])),
        client.post("/predict", json=predict_body(photo, {"result": [{"type": "polygonlabels", "value": {}}]})),
        client.post("/predict", json=predict_body(photo, {"result": [keypoint(150, 20, photo)]})),
        client.post("/predict", json=predict_body(photo, {"result": [rectangle(10, 10, 0, 0, photo)]})),
        client.post("/predict", json=predict_body(photo, {"result": [{**keypoint(5, 5, photo),
                                                                       "original_width": None}]})),
        client.post("/predict", json=predict_body(photo, "context")),
        client.post("/predict", json=predict_body(photo, None, config="<View>")),
        client.post("/webhook", json={"project": {}}),
    ]
    for response in cases:
        assert response.status_code == 400, response.get_json()
        assert response.get_json()["error"]
        # Label Studio shows the status line of a failed call: the message rides in the reason phrase
        assert response.status.split(" ", 1)[1] != "BAD REQUEST"


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_malformed_input_gets_4xx_never_500(client, photo, tmp_path):
    """The fuzz cases of the hardening campaign: each answers 4xx with a message, nothing is stored."""
    point = keypoint(50, 50, photo)
    webhook_dir = client.application.extensions["samlight"].sink.directory
    recorded_before = len(list(FileCorrectionSink(webhook_dir).events()))
    cases = {
        "deep JSON": ("/predict", '{"tasks": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "JSON past the depth limit": ("/predict", {**predict_body(photo, None), "x": nested(70)}),
        "from_name is a list": ("/predict", predict_body(photo, {"result": [{**point, "from_name": ["point"]}]})),
        "from_name is an object": ("/predict", predict_body(photo, {"result": [{**point, "from_name": {"a": 1}}]})),
        "huge integer coordinate": ("/predict", predict_body(photo, {"result": [
            {**point, "value": {**point["value"], "x": 10 ** 400}}]})),
        "huge original_width": ("/predict", predict_body(photo, {"result": [{**point, "original_width": 10 ** 30}]})),
        "8000 keypoints": ("/predict", predict_body(photo, {"result": [point] * 8000})),
        "65 keypoints": ("/predict", predict_body(photo, {"result": [point] * 65})),
        "33 rectangles": ("/predict", predict_body(photo, {"result": [rectangle(5, 5, 20, 20, photo)] * 33})),
        "webhook without annotation.id": ("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"result": []}}),
        "webhook annotation is a string": ("/webhook", {"action": "ANNOTATION_UPDATED", "annotation": "x"}),
        "webhook task.data is a string": ("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 5},
                                                       "task": {"id": 1, "data": "image.jpg"}}),
        "bulk webhook not a list": ("/webhook", {"action": "ANNOTATIONS_CREATED", "annotation": {"id": 1}}),
        "delete without ids": ("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"x": 1}]}),
        "extra_params not JSON": ("/setup", {"schema": SMART_CONFIG, "extra_params": "{"}),
    }
    for name, (path, body) in cases.items():
        data = body if isinstance(body, str) else json.dumps(body)
        response = client.post(path, data=data, content_type="application/json")
        assert 400 <= response.status_code < 500, (name, response.status_code, response.get_json())
        assert response.get_json()["error"], name
    assert len(list(FileCorrectionSink(webhook_dir).events())) == recorded_before  # nothing malformed stored


def test_extreme_images_get_a_clear_4xx(tmp_path):
    Image.new("RGB", (5000, 1)).save(tmp_path / "strip.png")
    with ImageHost(tmp_path) as host:
        client = make_app(host, tmp_path / "models", ModelSource(test_model="geometry")).test_client()
        body = predict_body({"url": "/data/upload/strip.png", "width": 5000, "height": 1},
                            {"result": [keypoint(50, 50, {"width": 5000, "height": 1})]})
        response = client.post("/predict", json=body)
        assert response.status_code == 422 and "aspect ratio" in response.get_json()["error"]


def test_bulk_annotations_created_is_recorded_per_annotation(host, tmp_path):
    app = make_app(host, tmp_path, ModelSource(test_model="geometry"))
    client = app.test_client()
    sink = FileCorrectionSink(app.extensions["samlight"].sink.directory)
    before = len(list(sink.events()))
    tasks = [{"id": 11, "data": {"image": "/data/upload/a.jpg"}}, {"id": 12, "data": {"image": "/data/upload/b.jpg"}}]
    annotations = [{"id": 101, "task": 12, "result": []}, {"id": 102, "task": 11, "result": []}]
    response = client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "annotation": annotations,
                                             "task": tasks, "project": {"id": 1}})
    assert response.status_code == 200 and response.get_json()["events"] == 2
    recorded = list(sink.events())[before:]
    assert [(e["action"], e["annotation"]["id"], e["task"]["data"]["image"]) for e in recorded] == [
        ("ANNOTATION_CREATED", 101, "/data/upload/b.jpg"), ("ANNOTATION_CREATED", 102, "/data/upload/a.jpg")]


def test_image_failures_are_clear(client, photo):
    missing = dict(photo, url="/data/upload/missing.jpg")
    response = client.post("/predict", json=predict_body(missing, {"result": [keypoint(5, 5, photo)]}))
    assert response.status_code == 502 and "not found" in response.get_json()["error"]
    text = dict(photo, url="/text")
    response = client.post("/predict", json=predict_body(text, {"result": [keypoint(5, 5, photo)]}))
    assert response.status_code == 422 and "not an image" in response.get_json()["error"]


def test_failed_clicks_show_in_health(host, tmp_path, photo):
    # Label Studio shows the annotator nothing when a click fails: /health is where an operator sees it
    client = make_app(host, tmp_path, ModelSource(test_model="geometry")).test_client()
    assert client.get("/health").get_json()["failures"] == {"count": 0, "by_endpoint": {}, "recent": []}
    missing = dict(photo, url="/data/upload/missing.jpg")
    client.post("/predict", json=predict_body(missing, {"result": [keypoint(5, 5, photo)]}))
    client.post("/setup", json={"schema": SMART_CONFIG, "extra_params": "{oops"})
    failures = client.get("/health").get_json()["failures"]
    assert failures["count"] == 2 and failures["by_endpoint"] == {"/predict": 1, "/setup": 1}
    latest, first = failures["recent"]
    assert latest["status"] == 400 and "extra_params" in latest["message"]
    assert first["status"] == 502 and "missing.jpg" in first["message"]


def test_basic_auth(host, tmp_path):
    app = make_app(host, tmp_path, ModelSource(test_model="geometry"), basic_auth_user="ann",
                   basic_auth_pass="s3cret")
    client = app.test_client()
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=("ann", "wrong")).status_code == 401
    assert client.get("/health", auth=("ann", "s3cret")).status_code == 200
    assert client.post("/setup", auth=("ann", "s3cret"), json={"schema": SMART_CONFIG}).status_code == 200
    # non-ASCII credentials are simply wrong (not a 500); a user without a password cannot be configured
    headers = {"Authorization": "Basic " + base64.b64encode("änn:sécret".encode()).decode()}
    assert client.get("/health", headers=headers).status_code == 401
    unicode = make_app(host, tmp_path, ModelSource(test_model="geometry"), basic_auth_user="änn",
                       basic_auth_pass="sécret").test_client()
    assert unicode.get("/health", headers=headers).status_code == 200
    with pytest.raises(ValueError, match="without BASIC_AUTH_PASS"):
        make_app(host, tmp_path, ModelSource(test_model="geometry"), basic_auth_user="ann")


# --- webhooks and corrections -------------------------------------------------------------------------------

def test_webhooks_are_recorded_and_masks_round_trip(app, client, photo):
    region, mask = only_region(client.post("/predict", json=predict_body(photo, {"result": [
        rectangle(10, 20, 30, 40, photo)]})), photo)
    annotation = {"id": 3, "task": 7, "result": [region], "was_cancelled": False}
    events = [{"action": "ANNOTATION_CREATED", "annotation": annotation, "task": {"id": 7}, "project": {"id": 1}},
              {"action": "ANNOTATION_UPDATED", "annotation": annotation, "task": {"id": 7}, "project": {"id": 1}},
              {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}], "project": {"id": 1}},
              {"action": "START_TRAINING", "project": {"id": 1}},
              {"action": "PROJECT_UPDATED", "project": {"id": 1}}]
    for event in events:
        response = client.post("/webhook", json=event)
        assert response.status_code == 200
        assert response.get_json()["status"] == ("ignored" if event["action"] == "PROJECT_UPDATED" else "recorded")
    sink = FileCorrectionSink(app.extensions["samlight"].sink.directory)
    recorded = list(sink.events())
    assert [e["action"] for e in recorded] == [e["action"] for e in events[:4]]
    masks = brush_regions(recorded[0]["annotation"]["result"])
    assert len(masks) == 1 and masks[0].labels == ["Object"] and masks[0].from_name == "mask"
    assert np.array_equal(masks[0].mask, mask)


def test_corrections_name_the_image_the_labeling_config_names(host, tmp_path):
    """Training must read the image the annotator saw: the config's ``$photo``, not a guess among the task's
    strings (the same rule as /predict)."""
    from serving.correction_stream import correction_from_event

    app = make_app(host, tmp_path, ModelSource(test_model="geometry"))
    config = SMART_CONFIG.replace('value="$image"', 'value="$photo"')
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 8, "result": []},
             "task": {"id": 3, "data": {"image": "/data/upload/thumb.jpg", "photo": "/data/upload/photo.jpg"}},
             "project": {"id": 1, "label_config": config}}
    assert app.test_client().post("/webhook", json=event).status_code == 200
    [recorded] = list(FileCorrectionSink(app.extensions["samlight"].sink.directory).events())
    assert correction_from_event(recorded).image == "/data/upload/photo.jpg"
    assert correction_from_event(event).image == "/data/upload/thumb.jpg"  # the old guess, without the config


def test_file_sink_is_safe_under_concurrent_writers(tmp_path):
    sink = FileCorrectionSink(tmp_path)
    payload = {"action": "ANNOTATION_CREATED", "annotation": {"result": ["x" * 10_000]}}
    threads = [threading.Thread(target=lambda i=i: [sink.record({**payload, "n": i * 100 + j}) for j in range(20)])
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = sink.log.path.read_text().splitlines()
    assert len(lines) == 160 and sorted(json.loads(line)["event"]["n"] for line in lines) == sorted(
        i * 100 + j for i in range(8) for j in range(20))


# --- the real (random-weight) model ---------------------------------------------------------------------------

def test_real_model_click_and_box(host, tmp_path, photo):
    app = make_app(host, tmp_path, ModelSource(random="lightening_test"))
    client = app.test_client()
    _, mask = only_region(client.post("/predict", json=predict_body(photo, {"result": [keypoint(40, 50, photo)]})),
                          photo)
    _, box_mask = only_region(client.post("/predict", json=predict_body(photo, {"result": [
        rectangle(20, 20, 50, 50, photo)]})), photo)
    assert mask.shape == box_mask.shape == (photo["height"], photo["width"])
    cache = client.get("/health").get_json()["cache"]
    assert cache["entries"] == 1 and cache["hits"] >= 1  # the second prompt reused the embedding


def test_embedded_model_is_warmed_up_before_the_first_click(host, tmp_path):
    settings = BackendSettings(Settings(model_dir=tmp_path, model=ModelSource(random="lightening_test"),
                                        fetch=FetchSettings(label_studio_url=host.url, api_key=host.legacy_token)))
    assert settings.preload  # the default
    client = create_app(settings).test_client()
    deadline = time.monotonic() + 60
    while not client.get("/health").get_json()["model_loaded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    health = client.get("/health").get_json()
    assert health["model_loaded"] and health["warm_up_s"] > 0 and health["cache"]["entries"] == 0


def test_request_path_does_not_import_torch():
    code = ("import sys, backend.app, backend.adapter, serving.jobs, serving.segmenter, serving.images, "
            "serving.corrections, serving.labels, backend.prompts; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_health_answers_while_inference_runs_and_excess_clicks_wait_then_get_503(host, tmp_path, photo):
    # three threads per process leave one request slot; a click on a slow image holds it for two seconds
    app = make_app(host, tmp_path, ModelSource(test_model="geometry"), threads=3, slot_wait_s=0.3)
    slow = dict(photo, url="/slow")
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(response=app.test_client().post(
        "/predict", json=predict_body(slow, {"result": [keypoint(5, 5, photo)]}))))
    worker.start()
    client = app.test_client()
    deadline = time.monotonic() + 10
    while client.get("/health").get_json()["inflight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["inflight"] == 1  # answered during inference
    busy = client.post("/predict", json=predict_body(photo, {"result": [keypoint(5, 5, photo)]}))
    assert busy.status_code == 503 and "busy" in busy.get_json()["error"]
    assert client.post("/setup", json={"schema": SMART_CONFIG}).status_code == 200
    worker.join()
    assert outcome["response"].status_code == 422  # /slow is not an image, after its delay


def test_a_click_waits_for_a_slot_instead_of_being_refused(host, tmp_path, photo):
    app = make_app(host, tmp_path, ModelSource(test_model="geometry"), threads=3)  # default wait: 5 s
    slow = dict(photo, url="/slow")
    worker = threading.Thread(target=lambda: app.test_client().post(
        "/predict", json=predict_body(slow, {"result": [keypoint(5, 5, photo)]})))
    worker.start()
    client = app.test_client()
    while client.get("/health").get_json()["inflight"] == 0:
        time.sleep(0.01)
    only_region(client.post("/predict", json=predict_body(photo, {"result": [keypoint(5, 5, photo)]})), photo)
    worker.join()


def test_slow_images_do_not_hold_up_other_clicks(host, tmp_path, photo):
    # one model slot; three clicks wait on a slow image server meanwhile, without holding that slot
    settings = BackendSettings(Settings(model_dir=tmp_path, model=ModelSource(test_model="geometry"),
                                        fetch=FetchSettings(label_studio_url=host.url, api_key=host.legacy_token),
                                        embedded=EmbeddedSettings(inference_slots=1)), preload=False)
    app = create_app(settings)
    slow = [threading.Thread(target=lambda i=i: app.test_client().post(
        "/predict", json=predict_body(dict(photo, url=f"/slow?{i}"), {"result": [keypoint(5, 5, photo)]})))
        for i in range(3)]
    for thread in slow:
        thread.start()
    client = app.test_client()
    while client.get("/health").get_json()["inflight"] < 3:
        time.sleep(0.01)
    only_region(client.post("/predict", json=predict_body(photo, {"result": [keypoint(5, 5, photo)]})), photo)
    assert all(thread.is_alive() for thread in slow)  # answered while the slow fetches were still running
    for thread in slow:
        thread.join()


def test_serve_defaults_to_loud_random_weights(caplog):
    from backend.serve import environment, parse_args

    with caplog.at_level("WARNING"):
        env = environment(parse_args([]), {})
    assert env["SAMLIGHT_RANDOM"] == "lightening_t" and "RANDOM" in caplog.text
    env = environment(parse_args(["--checkpoint", "/m", "--port", "9191", "--workers", "2"]),
                      {"SAMLIGHT_RANDOM": "x"})
    assert (env["SAMLIGHT_CHECKPOINT"], env["PORT"], env["SAMLIGHT_WORKERS"]) == ("/m", "9191", "2")
    assert "SAMLIGHT_RANDOM" not in env
    assert "SAMLIGHT_RANDOM" not in environment(parse_args([]), {"REDIS_URL": "redis://h"})


@pytest.mark.slow
def test_prewarm_queue_is_bounded_by_the_cache(host):
    from serving.images import ImageFetcher
    from serving.jobs import SegmentJob
    from serving.segmenter import InProcessSegmenter

    segmenter = InProcessSegmenter(EmbeddedSettings(cache_entries=2), ModelSource(test_model="geometry"),
                                   ImageFetcher(host.url, host.legacy_token))
    segmenter.prewarm([SegmentJob(f"/slow?{i}", f"k{i}", prewarm_only=True) for i in range(5)])
    assert segmenter.health()["prewarm_pending"] == 2  # the other three were dropped, not queued
    deadline = time.monotonic() + 20
    while segmenter.health()["prewarm_pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segmenter.health()["prewarm_pending"] == 0


def test_with_redis_url_the_app_uses_the_workers_without_torch(redis_server, tmp_path):
    code = ("import sys; from backend.app import create_app; app = create_app(); "
            "services = app.extensions['samlight']; "
            "print(type(services.segmenter).__module__, type(services.segmenter).__name__); "
            "assert 'torch' not in sys.modules, 'torch imported on the request path'; "
            "assert app.test_client().post('/setup', json={'schema': open(sys.argv[1]).read()}).status_code == 200")
    config = tmp_path / "config.xml"
    config.write_text(SMART_CONFIG)
    env = {"REDIS_URL": redis_server.url, "MODEL_DIR": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, str(config)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["serving.remote", "RQSegmenter"]


@pytest.mark.slow
def test_serve_rejects_a_missing_checkpoint_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "backend.serve", "--checkpoint", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run([sys.executable, "-m", "backend.serve", "--random", "vit_huge"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model config" in out.stderr


@pytest.mark.slow
def test_cpu_fast_setting_builds_a_compiled_bf16_encoder():
    """SAMLIGHT_CPU_FAST=1: bf16 encoder weights where oneDNN supports them, and a compiled encoder."""
    import torch

    from serving.images import ImageFetcher
    from serving.segmenter import InProcessSegmenter
    from samlight.encoder_wrappers import CompiledEncoder

    settings = Settings.from_env({"SAMLIGHT_RANDOM": "lightening_test", "SAMLIGHT_DEVICE": "cpu",
                                  "SAMLIGHT_CPU_FAST": "1"})
    assert settings.embedded.cpu_fast and not Settings.from_env({}).embedded.cpu_fast
    predictor = InProcessSegmenter(settings.embedded, settings.model, ImageFetcher()).predictor()
    assert isinstance(predictor.encoder, CompiledEncoder)
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert next(predictor.model.image_encoder.parameters()).dtype == expected


@pytest.mark.slow
def test_cpu_int8_setting_builds_a_compiled_int8_encoder_and_keeps_the_float_model():
    """SAMLIGHT_CPU_INT8=1: int8 linears in a compiled copy of the encoder; the model keeps its float weights."""
    from serving.images import ImageFetcher
    from serving.segmenter import InProcessSegmenter
    from samlight.encoder_wrappers import CompiledEncoder
    from samlight.modeling.int8_linear import Int8Linear, available

    if not available():
        pytest.skip("needs oneDNN's int8 GEMM")
    settings = Settings.from_env({"SAMLIGHT_RANDOM": "lightening_test", "SAMLIGHT_DEVICE": "cpu",
                                  "SAMLIGHT_CPU_INT8": "1"})
    assert settings.embedded.cpu_int8 and not Settings.from_env({}).embedded.cpu_int8
    predictor = InProcessSegmenter(settings.embedded, settings.model, ImageFetcher()).predictor()
    assert isinstance(predictor.encoder, CompiledEncoder)
    assert any(isinstance(m, Int8Linear) for m in predictor.encoder.modules())
    assert not any(isinstance(m, Int8Linear) for m in predictor.model.image_encoder.modules())


def test_deployment_defaults_come_from_the_environment_and_projects_override_them(tmp_path):
    from serving.options import OptionsError, ProjectOptionsStore

    defaults = Settings.from_env({"SAMLIGHT_MIN_AREA": "0", "SAMLIGHT_OUTPUTS": "polygon, box",
                                  "SAMLIGHT_AUTO_ANNOTATE": "yes", "SAMLIGHT_AUTO_POINTS_PER_SIDE": "16",
                                  "SAMLIGHT_REFINE": "off"}).project_defaults
    assert (defaults.min_area, defaults.outputs, defaults.auto_annotate, defaults.auto_points_per_side,
            defaults.refine) == (0, ("polygon", "box"), True, 16, False)
    for variable, value, words in (("SAMLIGHT_MIN_SCORE", "2", "from 0 to 1"),
                                   ("SAMLIGHT_AUTO_POINTS_PER_SIDE", "many", "an integer"),
                                   ("SAMLIGHT_LARGEST_ONLY", "maybe", "on or off")):
        with pytest.raises((OptionsError, ValueError), match=f"{variable} must be .*{words}"):
            Settings.from_env({variable: value})
    store = ProjectOptionsStore(tmp_path, defaults)
    assert store.save("3.1", '{"min_area": 50}').min_area == 50
    assert store.get("3.1").outputs == ("polygon", "box")  # the deployment's, not set by the project
    assert ProjectOptionsStore(tmp_path, ProjectOptions()).get("3.1").outputs == ()  # a changed default reaches it

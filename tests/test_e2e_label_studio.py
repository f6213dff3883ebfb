"""End to end against a real Label Studio 1.23.2 and the real backend (gunicorn subprocesses).

Two backends are connected as a new user would connect them (``POST /api/ml``, ``is_interactive``):

- ``random``: seeded random ``lightening_test`` weights, 2 gunicorn workers x 4 threads, authenticating to Label
  Studio with a personal access token (exchanged and refreshed by the backend). Random weights make the mask
  content arbitrary, so this checks the protocol: masks decode to the image size, labels, scores, versions,
  batch predictions (prewarm, nothing stored), webhooks.
- ``geometry``: the test-only geometry model (a box answers with that box, a point with a disc), legacy token.
  Its masks are known, so this checks that a prompt lands where the annotator put it: the rectangle drawn on a
  COCO object's box comes back covering exactly that box, through Label Studio, the RLE and the EXIF size.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from serving.corrections import FileCorrectionSink
from serving.labels import SMART_CONFIG
from serving.labelstudio import brush_regions, rle_to_mask
from serving.testing import point_radius
from testbed import free_port
from e2e.labelstudio import LEGACY_TOKEN, Backend, LabelStudio, install_label_studio
from e2e.servers import ImageHost

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def coco_object(coco_tiny):
    """The largest annotated object of a val2017 image: (path, width, height, bbox x, y, w, h in pixels)."""
    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    annotation = max((a for a in data["annotations"] if not a.get("iscrowd") and
                      (coco_tiny / "val2017" / images[a["image_id"]]["file_name"]).is_file()),
                     key=lambda a: a["area"])
    image = images[annotation["image_id"]]
    path = coco_tiny / "val2017" / image["file_name"]
    width, height = Image.open(path).size
    return {"path": path, "width": width, "height": height, "bbox": annotation["bbox"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, coco_tiny):
    install_label_studio()
    root = tmp_path_factory.mktemp("e2e")
    host = ImageHost(coco_tiny / "val2017").__enter__()  # the "URL task" image server on 127.0.0.1
    studio = LabelStudio(root / "label-studio", free_port())
    studio.directory.mkdir()
    backends = []
    try:
        studio.start()
        personal_token = studio.api("POST", "/api/token/").json()["token"]
        # the URL task's image server is on loopback, which the backend refuses unless allowed
        common = {"LABEL_STUDIO_URL": studio.url, "SAMLIGHT_TORCH_THREADS": "1", "LOG_LEVEL": "INFO",
                  "SAMLIGHT_FETCH_ALLOW": "127.0.0.1"}
        random_backend = Backend(root / "random", free_port(),
                                 {**common, "LABEL_STUDIO_API_KEY": personal_token},
                                 ["--random", "lightening_test", "--workers", "2", "--threads", "4"]).start()
        backends.append(random_backend)
        geometry_backend = Backend(root / "geometry", free_port(),
                                   {**common, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "SAMLIGHT_TEST_MODEL": "geometry"},
                                   ["--threads", "4"]).start()
        backends.append(geometry_backend)
        yield {"studio": studio, "host": host, "random": random_backend, "geometry": geometry_backend}
    finally:
        for backend in backends:
            backend.stop()
        studio.stop()
        host.__exit__(None, None, None)


def make_project(studio: LabelStudio, title: str, coco_object: dict, url_image: str, backend: Backend):
    """A smart-config project with an uploaded COCO image and a URL task, connected to ``backend``."""
    project = studio.api("POST", "/api/projects", json={"title": title, "label_config": SMART_CONFIG}).json()
    with open(coco_object["path"], "rb") as f:
        studio.api("POST", f"/api/projects/{project['id']}/import",
                   files={"file": (coco_object["path"].name, f, "image/jpeg")})
    studio.api("POST", f"/api/projects/{project['id']}/import", json=[{"image": url_image}])
    ml = studio.api("POST", "/api/ml", json={"url": backend.url, "project": project["id"], "title": "samlight",
                                             "is_interactive": True}).json()
    assert ml["readable_state"] == "Connected", ml
    tasks = studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"]
    uploaded = next(t for t in tasks if t["data"]["image"].startswith("/data/upload/"))
    url_task = next(t for t in tasks if t["data"]["image"] == url_image)
    return project, ml, uploaded, url_task


def keypoint(x, y, size, positive=True):
    return {"id": "kp", "from_name": "point", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": size[0], "original_height": size[1], "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Object"]}}


def rectangle(x, y, w, h, size):
    return {"id": "rc", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "original_width": size[0], "original_height": size[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Object"]}}


def interactive(studio, ml, task, context) -> tuple[dict, np.ndarray]:
    body = studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                      json={"task": task["id"], "context": context}).json()
    assert "errors" not in body, body
    prediction = body["data"]
    assert prediction["model_version"] and len(prediction["result"]) == 1
    region = prediction["result"][0]
    assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "mask", "image")
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Object"]
    assert isinstance(region["score"], float)
    mask = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
    return region, mask > 0


def box_percent(coco_object):
    x, y, w, h = coco_object["bbox"]
    W, H = coco_object["width"], coco_object["height"]
    return 100 * x / W, 100 * y / H, 100 * w / W, 100 * h / H


def test_random_model_clicks_boxes_batch_and_webhooks(stack, coco_object):
    studio, backend = stack["studio"], stack["random"]
    url_image = f"{stack['host'].url}/files/{coco_object['path'].name}"
    project, ml, uploaded, url_task = make_project(studio, "samlight random", coco_object, url_image, backend)
    size = (coco_object["width"], coco_object["height"])
    bx, by, bw, bh = box_percent(coco_object)

    # a click in the middle of the object, then a negative click, on the uploaded image (token-protected)
    region, mask = interactive(studio, ml, uploaded, {"result": [keypoint(bx + bw / 2, by + bh / 2, size)]})
    assert mask.shape == (size[1], size[0])
    _, mask = interactive(studio, ml, uploaded, {"result": [keypoint(bx + bw / 2, by + bh / 2, size),
                                                           keypoint(bx + 1, by + 1, size, positive=False)]})
    assert mask.shape == (size[1], size[0])
    # a box on the URL task (an image server on 127.0.0.1, no token sent)
    _, box_mask = interactive(studio, ml, url_task, {"result": [rectangle(bx, by, bw, bh, size)]})
    assert box_mask.shape == (size[1], size[0])
    assert "Authorization" not in stack["host"].requests[-1][2]

    # batch predictions prewarm and store nothing: no empty prediction tabs, and the next open asks again
    studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project["id"]},
               json={"selectedItems": {"all": True, "excluded": []}})
    for task in (uploaded, url_task):
        assert studio.api("GET", "/api/predictions", params={"task": task["id"]}).json() == []

    # an annotation made from the suggested mask comes back through the webhook, durably recorded
    annotation = studio.api("POST", f"/api/tasks/{uploaded['id']}/annotations",
                            json={"result": [region], "lead_time": 2.5}).json()
    sink = FileCorrectionSink(backend.model_dir / "corrections")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["action"] == "ANNOTATION_CREATED" for e in sink.events()):
        time.sleep(0.2)
    created = [e for e in sink.events() if e["action"] == "ANNOTATION_CREATED"]
    assert created and created[-1]["annotation"]["id"] == annotation["id"]
    recorded = brush_regions(created[-1]["annotation"]["result"])
    expected = rle_to_mask(region["value"]["rle"], size[1], size[0])
    assert len(recorded) == 1 and np.array_equal(recorded[0].mask, expected > 127)

    versions = studio.api("GET", f"/api/ml/{ml['id']}/versions").json()
    assert "random-lightening_test-0" in versions["versions"]


def test_geometry_model_masks_land_on_the_prompted_object(stack, coco_object):
    studio, backend = stack["studio"], stack["geometry"]
    url_image = f"{stack['host'].url}/files/{coco_object['path'].name}"
    project, ml, uploaded, url_task = make_project(studio, "samlight geometry", coco_object, url_image, backend)
    size = (coco_object["width"], coco_object["height"])
    bx, by, bw, bh = box_percent(coco_object)

    # batch first: it prewarms both images in the (single) backend process
    studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project["id"]},
               json={"selectedItems": {"all": True, "excluded": []}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and studio.session.get(f"{backend.url}/health").json()["cache"]["entries"] < 2:
        time.sleep(0.1)
    assert studio.session.get(f"{backend.url}/health").json()["cache"]["entries"] == 2

    x, y, w, h = coco_object["bbox"]
    for task in (uploaded, url_task):
        _, mask = interactive(studio, ml, task, {"result": [rectangle(bx, by, bw, bh, size)]})
        ys, xs = np.nonzero(mask)
        # the mask covers the COCO object's box, to the pixel
        assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
        assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
        assert mask.sum() == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)

    cx, cy = x + w / 2, y + h / 2
    _, mask = interactive(studio, ml, uploaded, {"result": [keypoint(100 * cx / size[0], 100 * cy / size[1], size)]})
    ys, xs = np.nonzero(mask)
    radius = point_radius(size[1], size[0])
    assert abs(xs.mean() - cx) < 1 and abs(ys.mean() - cy) < 1
    assert abs(mask.sum() - np.pi * radius ** 2) < 0.05 * np.pi * radius ** 2

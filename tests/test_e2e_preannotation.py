"""Pre-annotation end to end: a real Label Studio 1.23.2, the real backend (gunicorn), an S3-compatible server.

- Cloud storage: Label Studio's S3 source storage points at moto's S3 server on loopback; the tasks it syncs
  hold ``s3://`` URIs, which the backend resolves through Label Studio's presign endpoint for each task (the
  token goes to Label Studio only; the presigned URL is fetched without it). A click and a batch prediction
  work on them; a URI no storage of the project holds fails with an error that says so.
- A large batch: "Retrieve Predictions" on 200 tasks reaches the backend as ONE /predict call (measured here);
  the backend answers what fits in its inline budget and posts the rest from its background thread. Every
  task ends with exactly one prediction.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from PIL import Image

from serving.labelstudio import rle_to_mask
from serving.labels import SMART_CONFIG
from testbed import S3Server, free_port
from e2e.labelstudio import LEGACY_TOKEN, Backend, LabelStudio, install_label_studio
from e2e.servers import ImageHost

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PHOTOS = 3
# random weights: the decoder's scores are near 0, so the quality thresholds are off; a coarse grid is enough
AUTO = {"auto_annotate": True, "auto_label": "Object", "auto_points_per_side": 4, "auto_pred_iou": 0,
        "auto_stability": 0, "min_area": 0}
INLINE_S = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory, coco_val_images):
    install_label_studio()
    root = tmp_path_factory.mktemp("e2e-preannotation")
    s3 = S3Server().start()
    host = ImageHost(coco_val_images[0].parent).__enter__()
    studio = LabelStudio(root / "label-studio", free_port())
    studio.directory.mkdir()
    backend = None
    try:
        bucket = s3.client()
        bucket.create_bucket(Bucket="photos")
        for path in coco_val_images[:PHOTOS]:
            bucket.upload_file(str(path), "photos", f"val/{path.name}")
        studio.start()
        # the S3 server and the URL tasks' image host are on loopback, which the backend refuses unless allowed
        backend = Backend(root / "backend", free_port(),
                          {"LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
                           "SAMLIGHT_FETCH_ALLOW": "127.0.0.1", "SAMLIGHT_AUTO_INLINE_S": str(INLINE_S),
                           "SAMLIGHT_TORCH_THREADS": "2", "LOG_LEVEL": "INFO"},
                          ["--random", "lightening_test"]).start()
        yield {"studio": studio, "s3": s3, "host": host, "backend": backend,
               "photos": {p.name: p for p in coco_val_images[:PHOTOS]}}
    finally:
        if backend is not None:
            backend.stop()
        studio.stop()
        host.__exit__(None, None, None)
        s3.stop()


def connect(studio: LabelStudio, backend: Backend, project: dict, options: dict) -> dict:
    ml = studio.api("POST", "/api/ml", json={"url": backend.url, "project": project["id"], "title": "samlight",
                                             "is_interactive": True, "extra_params": json.dumps(options)}).json()
    assert ml["readable_state"] == "Connected", ml
    return ml


def retrieve_predictions(studio: LabelStudio, project: dict) -> float:
    start = time.monotonic()
    studio.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project["id"]},
               json={"selectedItems": {"all": True, "excluded": []}})
    return time.monotonic() - start


def predictions_of(studio: LabelStudio, task_id: int) -> list[dict]:
    return studio.api("GET", "/api/predictions", params={"task": task_id}).json()


def test_s3_storage_tasks_get_clicks_and_automatic_masks(stack):
    studio, s3, backend = stack["studio"], stack["s3"], stack["backend"]
    project = studio.api("POST", "/api/projects", json={"title": "samlight s3", "label_config": SMART_CONFIG}).json()
    storage = studio.api("POST", "/api/storages/s3", json={
        "project": project["id"], "title": "photos", "bucket": "photos", "prefix": "val", "regex_filter": r".*\.jpg",
        "use_blob_urls": True, "presign": True, "presign_ttl": 15, "s3_endpoint": s3.url, "region_name": s3.REGION,
        "aws_access_key_id": s3.ACCESS_KEY, "aws_secret_access_key": s3.SECRET_KEY}).json()
    studio.api("POST", f"/api/storages/s3/{storage['id']}/sync")
    deadline = time.monotonic() + 60
    while len(tasks := studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"]) < PHOTOS:
        assert time.monotonic() < deadline, "the S3 storage did not sync its photos"
        time.sleep(0.5)
    # a task whose image is in a bucket no storage of the project holds
    studio.api("POST", f"/api/projects/{project['id']}/import", json=[{"image": "s3://elsewhere/val/x.jpg"}])
    ml = connect(studio, backend, project, AUTO)

    # a click on a synced task: the backend gets s3://photos/val/<name> and asks Label Studio to presign it
    task = tasks[0]
    name = base64.urlsafe_b64decode(task["data"]["image"].split("fileuri=")[1]).decode().rsplit("/", 1)[1]
    width, height = Image.open(stack["photos"][name]).size
    keypoint = {"id": "kp", "from_name": "point", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": True,
                "value": {"x": 50, "y": 50, "width": 0.6, "keypointlabels": ["Object"]}}
    body = studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                      json={"task": task["id"], "context": {"result": [keypoint]}}).json()
    assert "errors" not in body, body
    [region] = body["data"]["result"]
    assert rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"]).shape == \
        (height, width)
    log = backend.log.read_text()
    assert re.search(rf"masks for /tasks/{task['id']}/presign/\?fileuri=", log), log[-2000:]

    # the unknown bucket: the answer names the storage problem
    bad = next(t for t in studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"]
               if "elsewhere" in json.dumps(t["data"]) or "ZWxzZXdoZXJl" in json.dumps(t["data"]))
    body = studio.api("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                      json={"task": bad["id"], "context": {"result": [keypoint]}}).json()
    assert "could not presign s3://elsewhere/val/x.jpg" in json.dumps(body), body

    # Retrieve Predictions: automatic masks for every synced photo, none for the unknown bucket
    retrieve_predictions(studio, project)
    for task in tasks:
        [prediction] = predictions_of(studio, task["id"])
        assert prediction["result"] and {r["type"] for r in prediction["result"]} == {"brushlabels"}
        assert all(r["value"]["brushlabels"] == ["Object"] for r in prediction["result"])
    assert predictions_of(studio, bad["id"]) == []


def test_retrieve_predictions_on_hundreds_of_tasks_loses_none(stack):
    studio, backend, host = stack["studio"], stack["backend"], stack["host"]
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
              '<Label value="Object"/></RectangleLabels><KeyPointLabels name="kp" toName="image" smart="true">'
              '<Label value="Object"/></KeyPointLabels></View>')
    project = studio.api("POST", "/api/projects", json={"title": "samlight many", "label_config": config}).json()
    names = sorted(stack["photos"]) * 70
    studio.api("POST", f"/api/projects/{project['id']}/import",
               json=[{"image": f"{host.url}/files/{name}?copy={i}"} for i, name in enumerate(names[:200])])
    connect(studio, backend, project, AUTO)
    calls_before = len(re.findall(r"predict: \d+ task", backend.log.read_text()))
    before = studio.session.get(f"{backend.url}/health").json().get("preannotation", {})

    waited = retrieve_predictions(studio, project)
    assert waited < 60  # Label Studio's ML_TIMEOUT_PREDICT is 100 s: the backend answered within its budget
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = studio.session.get(f"{backend.url}/health").json()["preannotation"]
        progress = {k: v - before.get(k, 0) if isinstance(v, int) and k not in ("queued", "running") else v
                    for k, v in now.items()}
        if progress.get("submitted") and progress["queued"] == 0 and progress["running"] == 0:
            break
        time.sleep(1)
    assert progress.get("failed", 0) == 0, progress

    tasks = studio.api("GET", "/api/tasks", params={"project": project["id"], "page_size": 500}).json()["tasks"]
    assert len(tasks) == 200
    counts = [len(predictions_of(studio, task["id"])) for task in tasks]
    assert counts == [1] * 200, {c: counts.count(c) for c in set(counts)}
    # what Label Studio sent: one /predict call carrying all 200 tasks
    calls = re.findall(r"predict: (\d+) task", backend.log.read_text())[calls_before:]
    assert calls == ["200"], calls
    inline = 200 - progress["submitted"]
    assert 0 < inline < 200 and progress["posted"] + progress.get("skipped", 0) == progress["submitted"]
    print(f"\nRetrieve Predictions on 200 tasks: one /predict call, answered in {waited:.1f} s with {inline} "
          f"inline; {progress['submitted']} posted from the background")

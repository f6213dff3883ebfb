"""The README's quick start in Label Studio's own UI: a real Label Studio 1.23.2, the real backend (gunicorn),
headless Chromium (Debian's) driven by Playwright.

Follows the README as an annotator would: the model is connected through Settings -> Model -> Connect Model
(its "Extra params" box sent as text), a task is opened, a smart keypoint click and a smart rectangle are made
exactly as the README says, a region appears and is accepted, an Alt-click adds a negative point, the
annotation is submitted and reaches the backend's webhook with a brush mask of the image's size. Then the
backend restarts, a task opened before is opened again, and its first click must be served from the embedding
that opening the task computed. On failure, a screenshot and the browser console are saved under ``test-artifacts/``.
"""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from serving.corrections import FileCorrectionSink
from serving.labels import SMART_CONFIG
from serving.labelstudio import brush_regions, rle_to_mask
from conftest import REPO
from testbed import free_port
from e2e.browser import LabelingUI, chromium
from e2e.labelstudio import Backend, LabelStudio, install_label_studio

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ARTEFACTS = REPO / "test-artifacts" / "browser"
USER = ("e2e@example.com", "e2e-password-123")  # what e2e.labelstudio.LabelStudio starts with


@pytest.fixture(scope="module")
def photos(coco_tiny):
    """Three val2017 photos, the first with its largest object's box (pixels)."""
    data = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    present = [a for a in data["annotations"] if not a.get("iscrowd")
               and (coco_tiny / "val2017" / images[a["image_id"]]["file_name"]).is_file()]
    largest = max(present, key=lambda a: a["area"])
    first = coco_tiny / "val2017" / images[largest["image_id"]]["file_name"]
    others = [p for p in sorted((coco_tiny / "val2017").glob("*.jpg")) if p != first][:2]
    return {"paths": [first, *others], "bbox": largest["bbox"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    install_label_studio()
    root = tmp_path_factory.mktemp("browser")
    studio = LabelStudio(root / "label-studio", free_port())
    studio.directory.mkdir()
    backend = None
    try:
        studio.start()
        token = studio.api("POST", "/api/token/").json()["token"]  # a personal access token, as the README says
        backend = Backend(root / "backend", free_port(),
                          {"LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": token,
                           "SAMLIGHT_TORCH_THREADS": "1"},
                          ["--random", "lightening_test", "--threads", "4"]).start()
        yield studio, backend
    finally:
        if backend is not None:
            backend.stop()
        studio.stop()


def backend_cache(studio, backend) -> dict:
    health = studio.session.get(f"{backend.url}/health", timeout=5).json()
    return {**health.get("cache", {"entries": 0, "hits": 0, "misses": 0}),
            "busy": health["inflight"] + health["prewarm_pending"]}


def wait_for_prewarm(studio, backend, entries: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cache = backend_cache(studio, backend)
        if cache["entries"] >= entries and cache["busy"] == 0:
            return cache
        time.sleep(0.2)
    raise AssertionError(f"opening the task did not prewarm its embedding: {backend_cache(studio, backend)}")


def suggested_mask(call: dict, size: tuple[int, int]) -> np.ndarray:
    assert "errors" not in call["answer"], call["answer"]
    [region] = call["answer"]["data"]["result"]
    assert (region["type"], region["from_name"], region["value"]["brushlabels"]) == ("brushlabels", "mask", ["Object"])
    assert 0 <= region["score"] <= 1
    mask = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
    assert mask.shape == (size[1], size[0])
    return mask


def test_readme_quick_start_in_the_browser(stack, photos):
    studio, backend = stack
    project = studio.api("POST", "/api/projects", json={"title": "browser", "label_config": SMART_CONFIG}).json()
    for path in photos["paths"]:
        with open(path, "rb") as f:
            studio.api("POST", f"/api/projects/{project['id']}/import", files={"file": (path.name, f, "image/jpeg")})
    tasks = sorted(studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"],
                   key=lambda t: t["id"])
    size = Image.open(photos["paths"][0]).size
    x, y, w, h = photos["bbox"]
    centre = ((x + w / 2) / size[0], (y + h / 2) / size[1])

    with chromium() as browser:
        ui = LabelingUI(browser, studio.url, ARTEFACTS)
        with ui.artefacts_on_failure("quick-start"):
            ui.log_in(*USER)
            # Connect Model through the form: its "Extra params" box reaches the backend as text
            ui.connect_model(project["id"], "samlight", backend.url, '{"prewarm": true}')
            [ml] = studio.api("GET", "/api/ml", params={"project": project["id"]}).json()
            assert ml["readable_state"] == "Connected", ml
            assert ml["is_interactive"] and ml["extra_params"] == '{"prewarm": true}'

            # opening a task prewarms its embedding, and stores no (empty) prediction
            ui.open_task(project["id"], tasks[0]["id"])
            wait_for_prewarm(studio, backend, entries=1)
            assert studio.api("GET", "/api/predictions", params={"task": tasks[0]["id"]}).json() == []

            # the README's steps: keep the label selected (once), Auto-Annotation on, Auto-Detect until the
            # smart keypoint, the label's hot key once, then click
            ui.keep_label_selected()
            ui.auto_annotation(True)
            assert ui.choose_smart_tool("key-point-tool") == 2  # smart brush first, then smart keypoint
            ui.page.keyboard.press("2")  # the keypoint control's label ("Object", hot key 2)
            assert ui.selected_labels()["point"] == ["Object"]
            with ui.interactive_call() as click:
                ui.click(*centre)
            suggested_mask(click, size)
            assert [r["type"] for r in click["context"]["result"]] == ["keypointlabels"]
            assert ui.store()["suggestions"] == ["brushregion"]
            # a second, negative click (Alt) refines the same object: both points go out together
            with ui.interactive_call() as negative:
                ui.click(x / size[0] + 0.01, y / size[1] + 0.01, negative=True)
            suggested_mask(negative, size)
            assert [r["is_positive"] for r in negative["context"]["result"]] == [True, False]
            # Label Studio keeps the first point's region id: the backend refined the first click's mask
            refinement = studio.session.get(f"{backend.url}/health", timeout=5).json()["refinement"]
            assert refinement["refined"] == 1, refinement
            ui.accept_suggestions()
            assert "brushregion" in ui.store()["regions"]

            # a smart rectangle around the object
            assert ui.choose_smart_tool("rectangle-tool") == 1
            ui.page.keyboard.press("3")  # the rectangle control's label
            with ui.interactive_call() as drag:
                ui.drag((x / size[0], y / size[1]), ((x + w) / size[0], (y + h) / size[1]))
            suggested_mask(drag, size)
            assert [r["type"] for r in drag["context"]["result"]] == ["rectanglelabels"]
            ui.accept_suggestions()
            assert ui.store()["regions"].count("brushregion") == 2

            # submit: the annotation reaches the backend's webhook, its masks decode to the image's size
            ui.submit()
            sink = FileCorrectionSink(backend.model_dir / "corrections")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(e["action"] == "ANNOTATION_CREATED" for e in sink.events()):
                time.sleep(0.2)
            [created] = [e for e in sink.events() if e["action"] == "ANNOTATION_CREATED"]
            assert created["task"]["id"] == tasks[0]["id"]
            masks = brush_regions(created["annotation"]["result"])
            assert len(masks) == 2 and all(m.mask.shape == (size[1], size[0]) for m in masks)
            assert all(m.labels == ["Object"] for m in masks)

            # every open prewarms, also of a task opened before a backend restart: its first click hits the cache
            ui.open_task(project["id"], tasks[1]["id"])
            wait_for_prewarm(studio, backend, entries=2)
            backend.stop()
            backend.start()
            ui.open_task(project["id"], tasks[2]["id"])
            ui.open_task(project["id"], tasks[1]["id"])
            before = wait_for_prewarm(studio, backend, entries=2)
            assert "key-point-tool (smart)" in ui.active_tools() or ui.choose_smart_tool("key-point-tool")
            if ui.selected_labels()["point"] != ["Object"]:
                ui.page.keyboard.press("2")
            with ui.interactive_call() as first:
                ui.click(0.5, 0.5)
            suggested_mask(first, Image.open(photos["paths"][1]).size)
            after = backend_cache(studio, backend)
            assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"]), (before, after)

        print(f"browser: click -> visible suggestion {click['ms']:.0f} ms (new image after prewarm), "
              f"negative click {negative['ms']:.0f} ms, rectangle {drag['ms']:.0f} ms, "
              f"first click after a backend restart {first['ms']:.0f} ms")


# Label Studio's COCO export refuses a config whose KeyPointLabels' labels lack model_index (HTTP 500, "No
# keypoint order found"), even when no keypoint is kept: the README's polygon config has it
POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image"><Label value="Object"/></PolygonLabels>
  <KeyPointLabels name="point" toName="image" smart="true">
    <Label value="Object" smart="true" model_index="0"/>
  </KeyPointLabels>
</View>"""


def coco_export(studio, project_id: int) -> dict:
    """Label Studio's own COCO export of the project (a zip holding result.json, or the JSON itself)."""
    response = studio.api("GET", f"/api/projects/{project_id}/export", params={"exportType": "COCO"})
    if response.content[:2] != b"PK":
        return response.json()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".json")]
        return json.loads(archive.read(name))


def one_photo_project(studio, title: str, config: str, path) -> tuple[dict, dict]:
    """A project with ``config`` and one uploaded photo: (project, its task)."""
    project = studio.api("POST", "/api/projects", json={"title": title, "label_config": config}).json()
    with open(path, "rb") as f:
        studio.api("POST", f"/api/projects/{project['id']}/import", files={"file": (path.name, f, "image/jpeg")})
    [task] = studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"]
    return project, task


def test_polygon_project_in_the_browser(stack, photos):
    """A project whose only target is PolygonLabels: a smart click gives a polygon region in the editor, and Label
    Studio's COCO export of the submitted annotation holds that polygon."""
    studio, backend = stack
    path = photos["paths"][0]
    project, task = one_photo_project(studio, "polygons", POLYGON_CONFIG, path)
    size = Image.open(path).size
    x, y, w, h = photos["bbox"]

    with chromium() as browser:
        ui = LabelingUI(browser, studio.url, ARTEFACTS)
        with ui.artefacts_on_failure("polygon-project"):
            ui.log_in(*USER)
            ui.connect_model(project["id"], "samlight", backend.url, '{"largest_only": true}')
            ui.open_task(project["id"], task["id"])
            ui.auto_annotation(True)  # "Keep label selected" stays off: see the annotation's check below
            ui.choose_only_smart_tool()  # the smart keypoint: the config's one smart control
            ui.page.keyboard.press("2")  # the keypoint control's label
            assert ui.selected_labels()["point"] == ["Object"]
            with ui.interactive_call() as click:
                ui.click((x + w / 2) / size[0], (y + h / 2) / size[1])
            assert "errors" not in click["answer"], click["answer"]
            [region] = click["answer"]["data"]["result"]  # largest_only: one part, one polygon
            assert (region["type"], region["from_name"]) == ("polygonlabels", "outline")
            assert region["value"]["polygonlabels"] == ["Object"] and region["value"]["closed"] is True
            assert ui.store()["suggestions"] == ["polygonregion"]
            ui.accept_suggestions()
            assert ui.store()["regions"] == ["polygonregion"]
            ui.submit()

    # the annotation holds the polygon alone (with "Keep label selected" on, Label Studio would also attach the
    # still-selected keypoint label to it: a keypointlabels copy of the polygon, which its COCO export rejects)
    [annotation] = studio.api("GET", f"/api/tasks/{task['id']}/annotations").json()
    assert [r["type"] for r in annotation["result"]] == ["polygonlabels"]
    coco = coco_export(studio, project["id"])
    [annotation] = coco["annotations"]
    # a config with KeyPointLabels gets Label Studio's keypoint-style category list ("default")
    assert annotation["category_id"] in {c["id"] for c in coco["categories"]}
    [segmentation] = annotation["segmentation"]
    exported = np.array(segmentation).reshape(-1, 2)
    answered = np.array(region["value"]["points"]) * np.array(size) / 100
    assert exported.shape == answered.shape and np.allclose(exported, answered, atol=0.5)


def test_pre_annotation_shows_in_the_editor(stack, photos):
    """With auto_annotate in the model's extra params (set in the Connect Model form), opening a task shows the
    automatic masks in Label Studio's editor as the model's prediction, labelled, ready to correct."""
    studio, backend = stack
    project, task = one_photo_project(studio, "pre-annotation", SMART_CONFIG, photos["paths"][1])
    options = ('{"auto_annotate": true, "auto_label": "Object", "auto_points_per_side": 4, "auto_pred_iou": 0, '
               '"auto_stability": 0, "min_area": 0}')  # random weights: predicted IoUs near 0

    with chromium() as browser:
        ui = LabelingUI(browser, studio.url, ARTEFACTS)
        with ui.artefacts_on_failure("pre-annotation"):
            ui.log_in(*USER)
            ui.connect_model(project["id"], "samlight", backend.url, options)
            ui.open_task(project["id"], task["id"])
            ui.page.wait_for_function("() => window.Htx.annotationStore.predictions.length > 0", timeout=60_000)
            shown = ui.evaluate("() => window.Htx.annotationStore.predictions.map(p => ({"
                                " version: p.createdBy, regions: p.regions.map(r => [r.type, r.labels])}))")
            ui.save_artefacts("pre-annotation")  # a look at the editor showing the masks
    [prediction] = shown
    assert prediction["regions"], shown
    assert all(kind == "brushregion" and labels == ["Object"] for kind, labels in prediction["regions"]), shown
    [stored] = studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
    assert stored["model_version"] == studio.session.get(f"{backend.url}/health").json()["model_version"]

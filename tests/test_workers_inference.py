"""Inference through Redis and real RQ worker processes (2 CPU workers, reduced random model)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from _workers_support import start_inference_worker, stop, wait_for_workers
from serving.config import WorkerSettings
from serving.images import ImageFetcher
from serving.jobs import ObjectJob, OutputSpec, SegmentJob
from serving.labelstudio import rle_from_base64, rle_to_mask
from testbed import FileServer, RedisServer
from e2e.servers import ImageHost, make_jwt
from serving.remote import RQSegmenter
from serving.registry import ModelRegistry, RegistryError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WORKERS = ["w1", "w2"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, coco_tiny):
    """redis-server + image server + two inference workers, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(tmp)
    redis.start()
    images = FileServer(coco_tiny / "val2017", slow_s=8.0)
    # a stand-in for Label Studio's file serving, with a personal access token (JWT refresh exchange)
    label_studio = ImageHost(coco_tiny / "val2017", personal_token=make_jwt({"token_type": "refresh"})).__enter__()
    model_dir = tmp / "models"
    processes = {name: start_inference_worker(redis.url, model_dir, name, tmp, SAMLIGHT_MAX_BATCH=4,
                                              LABEL_STUDIO_URL=label_studio.url,
                                              LABEL_STUDIO_API_KEY=label_studio.personal_token)
                 for name in WORKERS}
    fetcher = ImageFetcher()
    segmenter = RQSegmenter(WorkerSettings(redis.url, model_dir, deadline_ms=20000), fetcher)
    try:
        wait_for_workers(segmenter, WORKERS)
        yield {"redis": redis, "images": images, "segmenter": segmenter, "processes": processes,
               "model_dir": model_dir, "fetcher": fetcher, "tmp": tmp, "label_studio": label_studio,
               "names": sorted(p.name for p in (coco_tiny / "val2017").glob("*.jpg"))}
    finally:
        for process in processes.values():
            stop(process)
        images.close()
        label_studio.__exit__(None, None, None)
        redis.stop()


def click(fleet, index: int, point=(120.0, 90.0), slow: bool = False) -> SegmentJob:
    url = fleet["images"].file_url(fleet["names"][index], slow=slow)
    return SegmentJob(image_url=url, image_key=fleet["fetcher"].image_key(url),
                      objects=[ObjectJob(points=[list(point)], point_labels=[1])])


def test_click_round_trip(fleet):
    segmenter = fleet["segmenter"]
    [result] = segmenter.segment([click(fleet, 0)])
    assert "error" not in result, result
    [answer] = result["objects"]
    mask = rle_to_mask(rle_from_base64(answer["rle_base64"]), result["height"], result["width"])
    assert mask.shape == (result["height"], result["width"]) == (480, 640)
    assert result["model_version"] == "random-lightening_test-0" == segmenter.model_version
    assert result["worker"]["name"] in WORKERS and result["cached"] is False
    [again] = segmenter.segment([click(fleet, 0, point=(300.0, 200.0))])
    assert again["cached"] is True and again["worker"]["name"] == result["worker"]["name"]
    # bad prompt: a clean per-job error, not an exception
    [bad] = segmenter.segment([SegmentJob(image_url="ftp://x/y.jpg", image_key="k",
                                          objects=[ObjectJob(points=[[1, 1]], point_labels=[1])])])
    assert bad["status"] == 400 and "unsupported image URL" in bad["error"]
    health = segmenter.health()
    assert health["redis"] == "ok" and {w["name"] for w in health["workers"]} == set(WORKERS)
    # RQ's own tooling sees the workers and queues
    info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "-u", fleet["redis"].url],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "samlight-infer" in info.stdout and "w1" in info.stdout, info.stdout + info.stderr
    # the answer came on its reply list (consumed); RQ's result keeps a summary without the mask, so
    # Redis does not hold every click's RLE for result_ttl
    assert not segmenter.redis.keys("samlight:reply:*")

    def recorded():  # RQ records the jobs on the workers' bookkeeping threads, after the answers
        found = [Job.fetch(key.decode().rsplit(":", 1)[-1], connection=segmenter.redis,
                           serializer=JSONSerializer).return_value()
                 for key in segmenter.redis.keys("rq:results:click-*")]
        return [s for s in found if s and "error" not in s]

    deadline = time.monotonic() + 10
    while len(recorded()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    summaries = recorded()
    assert summaries and all("rle_base64" not in s["objects"][0] and "score" in s["objects"][0]
                             and s["replied_to"].startswith("samlight:reply:click-") for s in summaries), summaries


def test_worker_refines_a_click_and_answers_several_rectangles_with_every_output(fleet):
    """The worker holding the image keeps each click's logits: the next click on the same object refines it;
    several rectangles are answered in one job, in every output form, and an answered one is skipped."""
    segmenter = fleet["segmenter"]
    url = fleet["images"].file_url(fleet["names"][3])
    key = fleet["fetcher"].image_key(url)

    def run(*objects, output=OutputSpec()):
        [result] = segmenter.segment([SegmentJob(image_url=url, image_key=key, objects=list(objects), output=output)])
        assert "error" not in result, result
        return result

    first = run(ObjectJob(points=[[120.0, 90.0]], point_labels=[1], key="r1"))
    worker = first["worker"]["name"]
    second = run(ObjectJob(points=[[120.0, 90.0], [200.0, 90.0]], point_labels=[1, 0], key="r2", refine="r1"))
    assert second["worker"]["name"] == worker and second["objects"][0]["refined"] is True
    new = run(ObjectJob(points=[[300.0, 200.0], [310.0, 210.0]], point_labels=[1, 1], key="n2", refine="n1"))
    assert new["objects"][0]["refined"] is False  # nothing kept under n1: a new object
    boxes = [[10.0, 10.0, 200.0, 200.0], [300.0, 100.0, 500.0, 300.0], [50.0, 250.0, 250.0, 400.0]]
    several = [ObjectJob(box=b, key=f"box-{i}", skip_answered=True) for i, b in enumerate(boxes)]
    result = run(*several[:2], output=OutputSpec(polygon=True, box=True, min_area=100))
    assert all({"rle_base64", "polygons", "box", "score"} <= set(o) for o in result["objects"])
    again = run(*several, output=OutputSpec(brush=False, polygon=True, min_area=100))
    assert [("skipped" in o) for o in again["objects"]] == [True, True, False]
    assert "rle_base64" not in again["objects"][2] and again["objects"][2]["polygons"]


def test_routing_reuses_embeddings_across_workers(fleet):
    segmenter = fleet["segmenter"]
    redis = segmenter.redis
    indices = list(range(1, 9))
    done_before = sum(w.get("jobs", 0) for w in segmenter.worker_info())
    segmenter.prewarm([click(fleet, i) for i in indices])  # routed like clicks, drained in micro-batches
    keys = [click(fleet, i).image_key for i in indices]
    # routes are claimed when the prewarm is queued; wait until the embeddings exist (the prewarm jobs ran),
    # or a click could share a micro-batch with its own image's prewarm and count as a miss
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(w.get("jobs", 0) for w in segmenter.worker_info()) < done_before + 8:
        time.sleep(0.1)
    owners = {k: redis.get(f"samlight:route:{k}").decode() for k in keys}
    results = segmenter.segment([click(fleet, i, point=(50.0 + 10 * n, 60.0)) for n, i in enumerate(indices)
                                 for _ in range(2)])
    assert all("error" not in r for r in results), results
    hits = sum(r["cached"] for r in results)
    assert hits == len(results)  # every click reached the worker holding its image's embedding
    for n, i in enumerate(indices):
        for r in results[2 * n: 2 * n + 2]:
            assert r["worker"]["name"] == owners[keys[n]]
    assert max(r["worker"]["batch"] for r in results) > 1  # queued clicks were drained into batches


def test_backend_app_over_rq(fleet, monkeypatch):
    """The Flask backend with REDIS_URL: clicks, webhooks, /versions, /setup and /health go through Redis."""
    from backend.app import create_app
    from serving.config import FetchSettings, Settings
    from serving.labels import SMART_CONFIG
    from backend.settings import BackendSettings

    monkeypatch.setenv("MODEL_DIR", str(fleet["model_dir"]))
    host = fleet["label_studio"]
    settings = BackendSettings(Settings(redis_url=fleet["redis"].url, model_dir=fleet["model_dir"], fetch=FetchSettings(
        label_studio_url=host.url, api_key=host.personal_token)), preload=False)
    client = create_app(settings).test_client()
    health = client.get("/health")
    assert health.status_code == 200 and {w["name"] for w in health.get_json()["workers"]} == set(WORKERS)
    name = fleet["names"][30]
    task = {"id": 3, "data": {"image": f"/data/upload/{name}"}}
    point = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels", "original_width": 640,
             "original_height": 480, "is_positive": True, "value": {"x": 40, "y": 50, "keypointlabels": ["Object"]}}
    body = {"tasks": [task], "label_config": SMART_CONFIG, "params": {"context": None}}
    assert client.post("/predict", json=body).status_code == 200  # opening the task prewarms on the fleet
    body["params"]["context"] = {"result": [point]}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    [region] = response.get_json()["results"][0]["result"]
    height, width = region["original_height"], region["original_width"]
    assert rle_to_mask(region["value"]["rle"], height, width).shape == (height, width)
    # the workers fetched the image from "Label Studio" with an exchanged access token
    fetches = [h for method, path, h in host.requests if path == f"/data/upload/{name}"]
    assert fetches and all(h.get("Authorization", "").startswith("Bearer ") for h in fetches)
    assert any(path == "/api/token/refresh/" for _, path, _ in host.requests)
    # a polygon and box project over RQ: the worker computes the outputs, the backend writes the regions
    config = SMART_CONFIG.replace("</View>", '<PolygonLabels name="outline" toName="image"><Label value="Object"/>'
                                             '</PolygonLabels><RectangleLabels name="bbox" toName="image">'
                                             '<Label value="Object"/></RectangleLabels></View>')
    answer = client.post("/predict", json={**body, "label_config": config, "extra_params": {
        "outputs": ["polygon", "box"], "largest_only": True}}).get_json()["results"][0]["result"]
    assert sorted(r["type"] for r in answer) == ["polygonlabels", "rectanglelabels"]
    assert all(len(r["value"]["points"]) >= 3 for r in answer if r["type"] == "polygonlabels")
    event = {"action": "ANNOTATION_CREATED", "task": task, "project": {"id": 1},
             "annotation": {"id": 55, "updated_at": "2026-11-24T10:00:00Z", "result": [region]}}
    assert client.post("/webhook", json=event).status_code == 200
    assert fleet["segmenter"].redis.hexists("samlight:corrections", "55")
    versions = client.get("/versions").get_json()
    assert versions["versions"][0] == versions["model_version"] == client.post("/setup", json={
        "project": "1.1", "schema": SMART_CONFIG}).get_json()["model_version"]


def test_a_large_batch_is_pre_annotated_inline_then_by_the_workers(fleet):
    """Retrieve Predictions on 300 tasks (Label Studio sends them in one call): the backend answers what fits in
    its inline budget, the workers finish the rest from RQ's bulk queue and post each task's prediction to
    Label Studio's API. Every task ends with exactly one prediction; none is lost or doubled."""
    from backend.app import create_app
    from backend.settings import BackendSettings
    from serving.config import FetchSettings, Settings

    host = fleet["label_studio"]
    settings = BackendSettings(Settings(redis_url=fleet["redis"].url, model_dir=fleet["model_dir"], fetch=FetchSettings(
        label_studio_url=host.url, api_key=host.personal_token)), preload=False, auto_inline_s=1.0)
    client = create_app(settings).test_client()
    # distinct URLs (each its own embedding) over the 80 photos
    tasks = [{"id": 1000 + i, "data": {"image": f"/data/upload/{fleet['names'][i % 80]}?copy={i}"}}
             for i in range(300)]
    options = {"auto_annotate": True, "auto_points_per_side": 4, "auto_pred_iou": 0, "auto_stability": 0,
               "min_area": 0, "outputs": ["box"]}
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image">'
              '<Label value="Object"/></RectangleLabels><KeyPointLabels name="kp" toName="image" smart="true">'
              '<Label value="Object"/></KeyPointLabels></View>')
    results = client.post("/predict", json={"tasks": tasks, "label_config": config, "extra_params": options}
                          ).get_json()["results"]
    inline = {task["id"] for task, answer in zip(tasks, results) if answer}
    assert len(results) == 300 and 0 < len(inline) < 300
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        progress = client.get("/health").get_json()["preannotation"]
        if progress.get("posted", 0) + progress.get("skipped", 0) + progress.get("failed", 0) >= 300 - len(inline):
            break
        time.sleep(0.5)
    assert progress["mode"] == "rq" and progress["submitted"] == 300 - len(inline), progress
    assert progress["posted"] == 300 - len(inline) and "failed" not in progress, progress
    posted = [p["task"] for p in host.predictions if p["task"] >= 1000]
    assert sorted(posted + sorted(inline)) == [task["id"] for task in tasks]  # each task once
    assert all(r["type"] == "rectanglelabels" for p in host.predictions for r in p["result"])


def test_no_worker_fails_fast(redis_server):
    segmenter = RQSegmenter(WorkerSettings(redis_server.url, deadline_ms=3000), ImageFetcher())
    started = time.monotonic()
    [result] = segmenter.segment([SegmentJob(image_url="http://127.0.0.1:9/a.jpg", image_key="k",
                                             objects=[ObjectJob(points=[[1, 1]], point_labels=[1])])])
    assert result["status"] == 503 and "no inference worker" in result["error"]
    assert time.monotonic() - started < 3.0
    assert segmenter.health()["fleet"] == "NO_WORKERS"
    redis_server.stop()
    [down] = segmenter.segment([SegmentJob(image_url="http://127.0.0.1:9/a.jpg", image_key="k",
                                           objects=[ObjectJob(points=[[1, 1]], point_labels=[1])])])
    assert down["status"] == 503 and "Redis" in down["error"]
    assert segmenter.health()["redis"].startswith("unreachable")


def _new_version(registry: ModelRegistry, seed: int):
    from samlight.modeling import build_student, seeded, student_config

    config = student_config("lightening_test")
    return registry.save_version(seeded(seed, build_student, config), config, parent=registry.active(),
                                 metrics={"seed": seed}, source="test")


def test_hot_reload_under_load_and_corrupt_version_rejected(fleet):
    segmenter = fleet["segmenter"]
    registry = ModelRegistry(fleet["model_dir"], segmenter.redis)
    errors, versions, stop_flag = [], [], threading.Event()
    latest: dict[int, str] = {}  # each annotator's last answer

    def annotator(offset: int):
        n = 0
        while not stop_flag.is_set():
            [r] = segmenter.segment([click(fleet, 10 + (offset + n) % 6, point=(100.0 + n % 50, 100.0))])
            n += 1
            (errors if "error" in r else versions).append(r.get("error") or r["model_version"])
            latest[offset] = r.get("model_version")

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        while len(versions) + len(errors) < 3 and time.monotonic() - started < 30:
            time.sleep(0.05)  # the old model is serving before the new one is published
        record = _new_version(registry, seed=7)
        registry.activate(record.version)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = segmenter.worker_info()
            if len(info) == 2 and all(w.get("version") == record.version for w in info):
                break
            time.sleep(0.2)
        # a batch that began on the old model finishes on it (the swap is atomic per batch): wait until every
        # annotator has had an answer from the new model; from then on only the new one may answer
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(latest.get(k) == record.version for k in range(3)):
            time.sleep(0.05)
        served_before = len(versions)
        time.sleep(1.5)
        # a corrupt version: the registry refuses to activate it, and workers told about it anyway reject it
        bad = _new_version(registry, seed=8)
        with open(registry.path(bad.version) / "model.safetensors", "r+b") as f:
            f.seek(200)
            f.write(b"\x00garbage\x00")
        with pytest.raises(RegistryError):
            registry.activate(bad.version)
        segmenter.redis.set("samlight:model:active", bad.version)
        segmenter.redis.publish("samlight:model:events", '{"event": "activate", "version": "%s"}' % bad.version)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = segmenter.worker_info()
            if all(bad.version in w.get("rejected", []) for w in info) and len(info) == 2:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        # what is reported is what serves, not the rejected active key
        assert segmenter.model_version == record.version and segmenter.versions()[0] == record.version
        # a worker (re)started now goes back to the last version that served, not to the base model
        late = start_inference_worker(fleet["redis"].url, fleet["model_dir"], "w3", fleet["tmp"])
        try:
            wait_for_workers(segmenter, ["w3"])
            [w3] = [w for w in segmenter.worker_info() if w["name"] == "w3"]
            assert w3["version"] == record.version and bad.version in w3["rejected"]
        finally:
            stop(late)
    finally:
        stop_flag.set()
        for t in threads:
            t.join()
        segmenter.redis.set("samlight:model:active", record.version)
    assert errors == []
    assert versions[0] == "random-lightening_test-0" and versions[-1] == record.version
    assert set(versions[served_before:]) == {record.version}  # the corrupt version never served a click
    assert all(bad.version in w["rejected"] for w in segmenter.worker_info())
    assert segmenter.versions()[0] == record.version


def test_worker_killed_mid_job(fleet):
    segmenter = RQSegmenter(WorkerSettings(fleet["redis"].url, fleet["model_dir"], deadline_ms=4000),
                            fleet["fetcher"])
    outcome = {}
    idle_by = time.monotonic() + 10  # heartbeats of the previous test's last batch must not be mistaken
    while any(w.get("busy") for w in segmenter.worker_info()) and time.monotonic() < idle_by:
        time.sleep(0.1)
    time.sleep(0.6)

    def request():
        started = time.monotonic()
        outcome["result"] = segmenter.segment([click(fleet, 20, slow=True)])[0]
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=request)
    thread.start()
    victim = None
    deadline = time.monotonic() + 3
    while victim is None and time.monotonic() < deadline:
        busy = [w["name"] for w in segmenter.worker_info() if w.get("busy")]
        victim = busy[0] if busy else None
        time.sleep(0.05)
    assert victim is not None, "no worker picked up the slow job"
    fleet["processes"][victim].send_signal(signal.SIGKILL)
    thread.join(timeout=10)
    assert outcome["result"]["status"] == 504 and "within 4000 ms" in outcome["result"]["error"]
    assert outcome["elapsed"] < 4.0 + 1.0
    survivor = next(name for name in WORKERS if name != victim)
    [result] = segmenter.segment([click(fleet, 21)])
    assert "error" not in result and result["worker"]["name"] == survivor, (result, segmenter.worker_info())


def test_cpu_int8_worker_compiles_during_warm_up(tmp_path, monkeypatch):
    """SAMLIGHT_CPU_INT8=1 on a CPU worker: int8 linears, compiled while the model warms up (before it serves
    any click), and micro-batches of several images reuse the one compiled shape."""
    from samlight.encoder_wrappers import CompiledEncoder
    from samlight.modeling.int8_linear import Int8Linear, available
    from serving.engine import InferenceRuntime
    from serving.source import ModelSource
    from serving.config import Settings

    if not available():
        pytest.skip("needs oneDNN's int8 GEMM")
    monkeypatch.setenv("SAMLIGHT_CPU_INT8", "1")
    settings = dataclasses.replace(Settings.from_env().rq, model_dir=tmp_path, max_batch=2)
    assert settings.cpu_int8 and not settings.cpu_fast
    runtime = InferenceRuntime(settings, None, "w0", "cpu", ModelSource(random="lightening_test"), fetcher=object())
    served = runtime.load_initial()
    encoder = served.predictor.encoder
    assert isinstance(encoder, CompiledEncoder) and encoder.error is None
    assert any(isinstance(m, Int8Linear) for m in encoder.modules())
    images = [np.full((48, 64, 3), value, dtype=np.uint8) for value in (30, 200)]
    together = served.predictor.embed_many(images, ["a", "b"])
    served.predictor.cache.clear()
    alone = [served.predictor.embed(image, key) for image, key in zip(images, ["a", "b"])]
    for batch, single in zip(together, alone):
        assert torch.allclose(batch.features, single.features, atol=1e-5)

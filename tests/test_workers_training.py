"""The whole loop on CPU: corrections -> DLD job on a training worker -> gated new version -> workers serve it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from _workers_support import REPO, start_inference_worker, stop, wait_for_workers, worker_env
from testbed import FileServer
from serving.images import ImageFetcher
from serving.jobs import ObjectJob, SegmentJob
from samlight.brush_rle import mask_to_rle
from samlight.checkpoints import load_student
from serving.config import WorkerSettings
from serving.correction_stream import RedisCorrectionSink
from serving.remote import RQSegmenter
from serving.registry import ModelRegistry
from serving.labelstudio import brush_regions
from serving.training import split
from serving.correction_stream import Correction

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def coco_corrections(coco_tiny, images: FileServer, count: int) -> list[dict]:
    """Webhook events whose annotations are COCO ground-truth masks as Label Studio brush RLE."""
    data = json.loads((coco_tiny / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd") and ann["area"] > 2000:
            by_image.setdefault(ann["image_id"], []).append(ann)
    events = []
    for info in data["images"]:
        anns = by_image.get(info["id"], [])[:3]
        if not anns or not (coco_tiny / "train2017" / info["file_name"]).exists():
            continue
        h, w = info["height"], info["width"]
        result = []
        for ann in anns:
            segm = ann["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w)) if isinstance(segm, list) else segm
            mask = mask_utils.decode(rle).astype(bool)
            result.append({"id": f"r{ann['id']}", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                           "original_width": w, "original_height": h,
                           "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["object"]}})
        n = len(events) + 1
        events.append({"action": "ANNOTATION_CREATED", "project": {"id": 1},
                       "task": {"id": n, "data": {"image": images.file_url(info["file_name"])}},
                       "annotation": {"id": 1000 + n, "task": n, "updated_at": f"2026-11-24T12:00:{n:02d}Z",
                                      "result": result}})
        if len(events) == count:
            break
    return events


def test_brush_masks_round_trip_and_split():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:20, 10:35] = True
    correction = Correction("7", 1, "t", "http://x/a.jpg", [
        {"type": "brushlabels", "original_width": 40, "original_height": 30,
         "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["a"]}},
        {"type": "rectanglelabels", "value": {}}])
    [decoded] = brush_regions(correction.result)
    assert np.array_equal(decoded.mask, mask) and decoded.labels == ["a"]
    bad = dict(correction.result[0], original_width=41)  # RLE that does not fit its declared size: skipped
    assert brush_regions([bad, correction.result[0]])[0].mask.shape == (30, 40) and len(brush_regions([bad])) == 0
    corrections = [Correction(str(i), i, "t", "u", []) for i in range(20)]
    train, held = split(corrections, 0.2)
    assert held and train and not {c.annotation_id for c in train} & {c.annotation_id for c in held}
    assert split(corrections, 0.2) == (train, held)  # stable: the same corrections judge every candidate


def test_corrections_to_dld_to_new_version_served(redis_server, tmp_path, coco_tiny):
    """RQ mode from a teacher-only start: the workers serve SAM; the first run builds and distils a student, the
    gate publishes it and the workers switch to it; a candidate that does not follow the teacher is refused."""
    images = FileServer(coco_tiny / "train2017")
    model_dir = tmp_path / "models"
    fetcher = ImageFetcher()
    segmenter = RQSegmenter(WorkerSettings(redis_server.url, model_dir, deadline_ms=20000), fetcher)
    inference = start_inference_worker(redis_server.url, model_dir, "w1", tmp_path, model="vit_test")  # the teacher
    training_env = worker_env(model_dir, SAMLIGHT_TEACHER="random:vit_test", SAMLIGHT_STUDENT_CONFIG="lightening_test",
                              SAMLIGHT_TRAIN_ENCODER_STEPS=3, SAMLIGHT_TRAIN_DECODER_STEPS=3, SAMLIGHT_TRAIN_BATCH=2,
                              SAMLIGHT_TRAIN_AUGMENT=0.5, SAMLIGHT_TRAIN_OUTPUT_WEIGHT=0.3,
                              SAMLIGHT_HOLDOUT_FRACTION=0.25, SAMLIGHT_GATE_TEACHER_BOX_IOU=0,
                              SAMLIGHT_GATE_TEACHER_POINT_IOU=0)  # 3 steps on CPU follow the teacher only so far
    try:
        sink = RedisCorrectionSink(WorkerSettings(redis_server.url, model_dir))
        for event in coco_corrections(coco_tiny, images, 5):
            assert sink.record(event)["stored"]
        queued = sink.record({"action": "START_TRAINING", "project": {"id": 1}})
        assert queued["job_id"] == "samlight-dld"
        wait_for_workers(segmenter, ["w1"])
        url = images.file_url(sorted(p.name for p in (coco_tiny / "train2017").glob("*.jpg"))[0])
        job = SegmentJob(image_url=url, image_key=fetcher.image_key(url), objects=[ObjectJob(box=[50, 50, 300, 300])])
        [before] = segmenter.segment([job])
        assert before["model_version"] == "random-vit_test-0"  # a teacher-only start

        for round_ in range(3):
            log = open(tmp_path / f"train{round_}.log", "wb")
            # the second round demands a fidelity to the teacher no 3-step student has: the gate must refuse it
            env = dict(training_env, SAMLIGHT_GATE_TEACHER_BOX_IOU="0.999") if round_ == 1 else training_env
            trainer = subprocess.run([sys.executable, "-m", "workers.training_worker", "--burst", "--redis-url",
                                      redis_server.url], cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, timeout=240)
            text = (tmp_path / f"train{round_}.log").read_text()
            assert trainer.returncode == 0, text
            from rq.job import Job
            from rq.serializers import JSONSerializer

            summary = Job.fetch("samlight-dld", connection=sink.redis, serializer=JSONSerializer).return_value()
            assert summary is not None, text
            if round_ == 0:
                first = summary
                assert summary["status"] == "published", summary
                registry = ModelRegistry(model_dir, sink.redis)
                record = registry.get(summary["version"])
                assert registry.active() == record.version and record.parent is None
                assert record.metrics["heldout"]["instances"] > 0 and record.metrics["gate"]["passed"]
                distilled = load_student(registry.path(record.version)).metadata["distill"]
                assert (distilled["augment"], distilled["output_weight"]) == (0.5, 0.3)  # the recipe's levers
                fidelity = record.metrics["teacher_fidelity"]
                assert 0 <= fidelity["point"] <= 1 and 0 <= fidelity["box"] <= 1 and fidelity["prompts"] > 0
                # the inference worker switches without a restart
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    [after] = segmenter.segment([job])
                    if after.get("model_version") == record.version:
                        break
                    time.sleep(0.2)
                assert after["model_version"] == record.version and "error" not in after
                # the reported version is the one the workers serve (their heartbeats): it follows within ~1 s
                deadline = time.monotonic() + 10
                while segmenter.model_version != record.version and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert segmenter.model_version == record.version
                # more corrections, and training again: now gated against the active version
                for event in coco_corrections(coco_tiny, images, 8)[5:]:
                    sink.record(event)
                sink.record({"action": "START_TRAINING"})
            elif round_ == 1:
                assert summary["status"] == "rejected", summary
                assert "active_heldout" in summary["metrics"]
                assert "box IoU to the teacher" in summary["metrics"]["gate"]["why"]
                assert registry.active() == first["version"]  # the refused candidate is never served
                shown = segmenter.health()["training"]  # what the backend's /health shows
                assert shown["last"]["status"] == "rejected" and "IoU to the teacher" in shown["last"]["why"]
                sink.record({"action": "START_TRAINING"})  # nothing new: the job must not train again
            else:
                assert summary["status"] == "up-to-date", summary
        assert sink.store.new_since_training() == 0
    finally:
        stop(inference)
        images.close()


def test_embedded_loop_from_a_teacher_only_start(tmp_path, coco_tiny):
    """No Redis: a backend serving only the SAM teacher (2 gunicorn processes) records corrections; Label
    Studio's Train button starts a training process that initialises a student from the teacher, distils it,
    gates and activates it; both processes hot-reload it and answer clicks with it. A later run whose student
    does not follow the teacher closely enough is refused, and the student keeps serving."""
    import requests

    from e2e.labelstudio import Backend
    from serving.labels import SMART_CONFIG
    from testbed import free_port

    images = FileServer(coco_tiny / "train2017")
    env = worker_env(tmp_path / "models", SAMLIGHT_TEACHER="random:vit_test", SAMLIGHT_STUDENT_CONFIG="lightening_test",
                     SAMLIGHT_TRAIN_ENCODER_STEPS=3, SAMLIGHT_TRAIN_DECODER_STEPS=3, SAMLIGHT_TRAIN_BATCH=2,
                     SAMLIGHT_HOLDOUT_FRACTION=0.25, SAMLIGHT_GATE_TEACHER_BOX_IOU=0,
                     SAMLIGHT_GATE_TEACHER_POINT_IOU=0)
    backend = Backend(tmp_path, free_port(), env, ["--random", "vit_test", "--workers", "2", "--threads", "4"])
    try:
        backend.start()
        health = requests.get(f"{backend.url}/health", timeout=10).json()
        assert health["model_version"] == "random-vit_test-0" and "training" in health
        assert health["model_role"] == "teacher"  # until the first student
        events = coco_corrections(coco_tiny, images, 8)
        for event in events[:5]:
            assert requests.post(f"{backend.url}/webhook", json=event, timeout=10).status_code == 200
        requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=10)

        deadline = time.monotonic() + 240
        pids = {}
        while time.monotonic() < deadline and (len(pids) < 2 or any(v == "random-vit_test-0" for v in pids.values())):
            health = requests.get(f"{backend.url}/health", timeout=10).json()
            pids[health["pid"]] = health["model_version"]
            time.sleep(0.2)
        assert len(pids) == 2 and len(set(pids.values())) == 1, (pids, health.get("training"))
        [student] = set(pids.values())
        assert student.startswith("lightening_test"), student
        assert health["training"]["last"]["status"] == "published" and health["model_role"] == "student"
        assert student in requests.get(f"{backend.url}/versions", timeout=10).json()["versions"]
        click = {"tasks": [{"id": 1, "data": {"image": events[0]["task"]["data"]["image"]}}],
                 "label_config": SMART_CONFIG, "params": {"context": {"result": [{
                     "id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels",
                     "original_width": 640, "original_height": 480, "is_positive": True,
                     "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}]}}}
        answer = requests.post(f"{backend.url}/predict", json=click, timeout=60).json()
        assert answer["results"][0]["model_version"] == student

        # more corrections, and a gate no 3-step student passes: refused, the student stays
        for event in events[5:]:
            requests.post(f"{backend.url}/webhook", json=event, timeout=10)
        refused = subprocess.run([sys.executable, "-m", "serving.local_training", "--reason", "test"], cwd=REPO,
                                 env=dict(env, SAMLIGHT_GATE_TEACHER_BOX_IOU="0.999"), capture_output=True,
                                 text=True, timeout=240)
        summary = json.loads(refused.stdout.strip().splitlines()[-1])
        assert summary["status"] == "rejected" and "box IoU to the teacher" in summary["why"], refused.stderr[-2000:]
        assert (tmp_path / "models" / "ACTIVE").read_text().strip() == student
        assert requests.get(f"{backend.url}/health", timeout=10).json()["training"]["last"]["status"] == "rejected"
    finally:
        backend.stop()
        images.close()


def test_embedded_runs_never_overlap_and_a_killed_run_resumes(tmp_path, coco_tiny):
    """The embedded training process: while another run holds the lock a second one reports busy and trains
    nothing; a run killed with SIGKILL after a checkpoint is resumed from it by the next run, which publishes
    the student."""
    import torch

    from serving.corrections import FileCorrectionSink
    from serving.local_training import exclusive

    images = FileServer(coco_tiny / "train2017")
    model_dir = tmp_path / "models"
    env = worker_env(model_dir, SAMLIGHT_TEACHER="random:vit_test", SAMLIGHT_STUDENT_CONFIG="lightening_test",
                     SAMLIGHT_TRAIN_ENCODER_STEPS=400, SAMLIGHT_TRAIN_DECODER_STEPS=2, SAMLIGHT_TRAIN_BATCH=2,
                     SAMLIGHT_HOLDOUT_FRACTION=0.25, SAMLIGHT_GATE_TEACHER_BOX_IOU=0,
                     SAMLIGHT_GATE_TEACHER_POINT_IOU=0)
    command = [sys.executable, "-m", "serving.local_training", "--reason", "test"]
    sink = FileCorrectionSink(model_dir / "corrections")
    try:
        for event in coco_corrections(coco_tiny, images, 5):
            sink.record(event)
        with exclusive(model_dir / "training" / "lock") as mine:
            assert mine
            busy = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(busy.stdout.strip().splitlines()[-1])["status"] == "busy", busy.stderr[-2000:]
        assert not list((model_dir / "training").glob("run-*"))

        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while not (states := list((model_dir / "training").glob("run-*/state/train_state.pt"))):
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        first.kill()
        first.wait(timeout=30)
        killed_at = torch.load(states[0], map_location="cpu", weights_only=False)
        assert killed_at["stage"] == "encoder" and 0 < killed_at["step"] < 400

        resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert summary["status"] == "published", resumed.stderr[-3000:]
        # the same run directory, from its last checkpoint (fine_tune's own tests check that a resumed run ends
        # with the uninterrupted run's weights)
        assert f"resuming encoder stage at step {killed_at['step']}" in resumed.stderr
        assert (model_dir / "ACTIVE").read_text().strip() == summary["version"]
    finally:
        images.close()

"""One DLD training run over the corrections received, gated and published: the learning loop's core.

Steps: the deduplicated corrections -> fetch their images from Label Studio (the backend's ``ImageFetcher``,
same URL rules and token as inference) and decode their brush masks (``label_studio_sdk``'s RLE decoder) ->
split a stable held-out set (by annotation id) -> ``samlight.distill.fine_tune`` from the active version (or,
from a teacher-only start, a named student config initialised from the teacher's prompt encoder and decoder)
-> publish and activate the candidate only if it passes the gate: mask IoU to the teacher on the held-out
images, under box and one-point prompts, at least ``gate_teacher_box_iou`` / ``gate_teacher_point_iou``, and
held-out mIoU better than, or within ``gate_margin`` of, the active version's. The metrics are stored with the
version (``/versions``); a refused candidate's reasons are in the summary and the log.

Idempotent and resumable: the run directory ``MODEL_DIR/training/run-<digest>`` is named by the parent
version, the teacher, the training corrections and the config, so a retried run resumes it (``fine_tune``
resumes from its own checkpoints); a run that already produced (or was refused) a version, or with no
correction changed since the active version was trained, is a no-op ("up-to-date").

Two drivers: the RQ job ``workers.training.run_training`` (corrections in Redis) and the embedded mode's
``python -m serving.local_training`` (corrections in the backend's event log). torch is imported only inside
``train``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np

from serving.config import Settings, TrainingSettings
from serving.correction_stream import Correction
from serving.labelstudio import brush_regions
from serving.registry import ModelRegistry

log = logging.getLogger(__name__)


class Corrections(Protocol):
    def all(self) -> list[Correction]: ...

    def new_since_training(self) -> int: ...

    def mark_trained(self, consumed: int) -> None: ...


class Refused(Protocol):
    """The digests of runs the gate refused (the same data and parent would give the same verdict)."""

    def __contains__(self, digest: str) -> bool: ...

    def add(self, digest: str) -> None: ...


def is_held_out(annotation_id: str, fraction: float) -> bool:
    """Stable split: the same corrections judge every candidate."""
    bucket = int(hashlib.sha256(f"holdout:{annotation_id}".encode()).hexdigest()[:8], 16) % 1000
    return bucket < fraction * 1000


def split(corrections: list[Correction], fraction: float) -> tuple[list[Correction], list[Correction]]:
    held = [c for c in corrections if is_held_out(c.annotation_id, fraction)]
    train = [c for c in corrections if not is_held_out(c.annotation_id, fraction)]
    if not held and len(train) >= 2 and fraction > 0:  # small projects: hold out at least one
        held, train = train[-1:], train[:-1]
    if not train and held:
        train = held
    return train, held


def to_samples(corrections: list[Correction], fetcher) -> list:
    from samlight.distill import TrainingSample

    samples = []
    for correction in corrections:
        masks = [region.mask for region in brush_regions(correction.result)]
        if not masks or not correction.image:
            continue
        try:
            image = fetcher.fetch(correction.image)
        except Exception as error:  # one missing image must not stop the run
            log.warning("annotation %s: image %s skipped: %s", correction.annotation_id, correction.image, error)
            continue
        masks = [m for m in masks if m.shape == image.shape[:2]]
        if masks:
            samples.append(TrainingSample(image=image, key=fetcher.image_key(correction.image), masks=masks))
    return samples


@functools.cache
def _remote_sample_class():
    """``TrainingSample`` whose image is fetched when the trainer reads it (defined on first use: the
    distillation package imports torch, which a training worker's parent process never does)."""
    from dataclasses import dataclass as _dataclass, field as _field

    from samlight.distill import TrainingSample

    @_dataclass
    class RemoteSample(TrainingSample):
        fetcher: object = _field(default=None, repr=False)

        def load_image(self):
            try:
                return self.fetcher.fetch(self.image)
            except Exception as error:  # noqa: BLE001 - one image gone since the listing must not stop the run
                log.warning("training image %s unavailable (%s): a blank image stands in", self.image, error)
                return np.zeros((64, 64, 3), dtype=np.uint8)

    return RemoteSample


def remote_sample(url: str, fetcher):
    """A training image without masks, fetched when the trainer reads it (a project may hold thousands)."""
    return _remote_sample_class()(image=url, key=fetcher.image_key(url), fetcher=fetcher)


def project_images(client, projects: set[int], limit: int) -> list[tuple[int, str]]:
    """``(task id, image URL)`` of the projects' tasks, through Label Studio's API (paged), by each project's
    labeling config (the same rule as ``/predict``), at most ``limit``."""
    from serving.images import FetchError, task_image_url
    from serving.labels import ConfigError, parse_config

    found: list[tuple[int, str]] = []
    for project in sorted(projects):
        try:
            key = parse_config(client.request("GET", f"/api/projects/{project}/").json()["label_config"]).image_value
        except (ConfigError, KeyError, ValueError) as error:
            log.warning("project %s: its images are not used for training: %s", project, error)
            continue
        page = 1
        while len(found) < limit:
            body = client.request("GET", "/api/tasks/", params={"project": project, "page": page,
                                                                "page_size": 100}).json()
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                url = (task.get("data") or {}).get(key)
                if isinstance(url, str) and isinstance(task.get("id"), int):
                    try:
                        found.append((task["id"], task_image_url(url, task["id"])))
                    except FetchError:
                        continue
            if len(tasks) < 100:
                break
            page += 1
    return found[:limit]


def box_miou(model, samples) -> dict:
    """Box-prompt mIoU on held-out samples (the evaluation protocol of ``samlight eval``)."""
    from samlight.eval import evaluate_samples

    return dict(evaluate_samples(model, samples, prompt="box"))


def teacher_fidelity(model, teacher, samples) -> dict:
    """Mask IoU to the teacher on held-out samples under box and one-point prompts, and embedding cosine."""
    from samlight.eval import fidelity

    box, point = (fidelity(model, teacher, samples, prompt=prompt) for prompt in ("box", "point"))
    return {"box": box["mask_iou"], "point": point["mask_iou"], "embedding_cosine": box["embedding_cosine"],
            "prompts": box["prompts"]}


def _project_samples(corrections: list[Correction], fetcher, limit: int, fraction: float) -> tuple[list, list]:
    """(training, held-out) samples of the corrected projects' other images; none without Label Studio's API."""
    from serving.labelstudio_api import LabelStudioApiError, LabelStudioClient

    projects = {c.project for c in corrections if isinstance(c.project, int)}
    if not projects or limit <= 0 or not LabelStudioClient.available(fetcher):
        return [], []
    corrected = {c.task_id for c in corrections}
    try:
        listed = project_images(LabelStudioClient(fetcher), projects, limit)
    except LabelStudioApiError as error:
        log.warning("the projects' images are not used for training: %s", error)
        return [], []
    listed = [(task, url) for task, url in listed if task not in corrected]
    held = [remote_sample(url, fetcher) for task, url in listed if is_held_out(f"task:{task}", fraction)]
    train = [remote_sample(url, fetcher) for task, url in listed if not is_held_out(f"task:{task}", fraction)]
    return train, held


def run_digest(parent: str | None, teacher_identity: str, corrections: list[Correction], config: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"parent": parent, "teacher": teacher_identity, "config": config},
                             sort_keys=True).encode())
    for c in sorted(corrections, key=lambda c: c.annotation_id):
        digest.update(f"{c.annotation_id}@{c.updated_at}\n".encode())
    return digest.hexdigest()[:16]


def train(config: Settings, training: TrainingSettings, store: Corrections, registry: ModelRegistry,
          refused: Refused, reason: str = "") -> dict:
    """One run; returns a JSON summary (status published / rejected / up-to-date / skipped, version, metrics)."""
    worker_settings = config.rq
    consumed = store.new_since_training()
    corrections = store.all()
    summary: dict = {"reason": reason, "corrections": len(corrections)}
    if len(corrections) < training.min_corrections:
        return dict(summary, status="skipped", why=f"fewer than {training.min_corrections} corrections")
    if not training.teacher:
        raise ValueError("set SAMLIGHT_TEACHER (e.g. vit_h:/weights/sam_vit_h.pth) for DLD fine-tuning")

    from samlight.distill import FineTuneConfig, fine_tune
    from samlight.models import ModelSpec
    from serving.images import ImageFetcher

    teacher_spec = ModelSpec.parse(training.teacher)
    active = registry.active()
    start_from = str(registry.path(active)) if active else training.student_config
    train_corr, held_corr = split(corrections, worker_settings.holdout_fraction)
    fetcher = ImageFetcher.from_settings(config.fetch)
    # every image of the corrected projects teaches the encoder (and the decoder the teacher's masks); a stable
    # share of them is held out for the gate's fidelity to the teacher
    unlabelled, held_unlabelled = _project_samples(corrections, fetcher, training.max_project_images,
                                                   worker_settings.holdout_fraction)
    summary["project_images"] = len(unlabelled) + len(held_unlabelled)
    config_fields = {"encoder_steps": training.encoder_steps, "decoder_steps": training.decoder_steps,
                     "batch_size": training.batch_size, "augment": training.augment,
                     "output_weight": training.output_weight}
    images = hashlib.sha256("\n".join(s.key for s in unlabelled + held_unlabelled).encode()).hexdigest()[:16]
    digest = run_digest(active, teacher_spec.identity, train_corr, {**config_fields, "project_images": images})
    data_digest = run_digest(None, "", corrections, {})  # what the corrections are, whatever the parent
    if active and registry.get(active).metrics.get("corrections") == data_digest:
        store.mark_trained(consumed)
        return dict(summary, status="up-to-date", version=active, why="no corrections since the active version")
    for version in registry.versions():
        if version.metrics.get("run") == digest:
            return dict(summary, status="up-to-date", version=version.version, run=digest)
    if digest in refused:
        store.mark_trained(consumed)
        return dict(summary, status="up-to-date", run=digest, why="this run was already rejected by the gate")

    train_samples, held_samples = to_samples(train_corr, fetcher), to_samples(held_corr, fetcher)
    if not train_samples:
        return dict(summary, status="skipped", why="no correction with a brush mask and a reachable image")
    train_samples, held_fidelity = train_samples + unlabelled, held_samples + held_unlabelled
    work = Path(worker_settings.model_dir) / "training" / f"run-{digest}"
    run_config = FineTuneConfig(out_dir=str(work), device=training.device, progress=False,
                            cache_dir=str(Path(worker_settings.model_dir) / "training" / "teacher-cache"),
                            checkpoint_every=max(1, min(50, (training.encoder_steps + training.decoder_steps) // 4 or 1)),
                            **config_fields)
    started = time.monotonic()
    log.info("DLD run %s: %d training / %d held-out samples, from %s, teacher %s", digest, len(train_samples),
             len(held_samples), start_from, teacher_spec.identity)
    teacher = teacher_spec.load()  # once: distillation, then the gate's fidelity
    candidate_dir = fine_tune(start_from, teacher_spec, train_samples, run_config, teacher=teacher)
    train_s = time.monotonic() - started

    from samlight.checkpoints import load_student

    candidate = load_student(candidate_dir)
    metrics = {"run": digest, "corrections": data_digest, "train_seconds": round(train_s, 2), "train_samples": len(train_samples),
               "heldout_samples": len(held_samples), "reason": reason}
    reasons, refusals = ["first version"] if not active else [], []
    if held_samples:
        metrics["teacher_fidelity"] = teacher_fidelity(candidate.model, teacher, held_fidelity)
        for prompt, floor in (("box", worker_settings.gate_teacher_box_iou),
                              ("point", worker_settings.gate_teacher_point_iou)):
            iou = metrics["teacher_fidelity"][prompt]
            (reasons if iou >= floor else refusals).append(f"{prompt} IoU to the teacher {iou:.4f} (floor {floor})")
        metrics["heldout"] = box_miou(candidate.model, held_samples)
        if active:
            baseline = registry.load(active).model
            metrics["active_heldout"] = box_miou(baseline, held_samples)
            cand, base = metrics["heldout"]["miou"], metrics["active_heldout"]["miou"]
            why = f"held-out mIoU {cand:.4f} vs active {base:.4f} (margin {worker_settings.gate_margin})"
            (reasons if cand >= base - worker_settings.gate_margin else refusals).append(why)
    decision = {"passed": not refusals, "why": "; ".join(refusals or reasons)}
    metrics["gate"] = decision
    if not decision["passed"]:
        log.warning("candidate rejected by the gate: %s", decision["why"])
        refused.add(digest)  # the same data and parent would give the same verdict: never rerun it
        shutil.rmtree(work, ignore_errors=True)
        store.mark_trained(consumed)
        return dict(summary, status="rejected", metrics=metrics, run=digest)
    record = registry.import_checkpoint(candidate_dir, parent=active, metrics=metrics, source="dld")
    registry.activate(record.version)
    store.mark_trained(consumed)
    shutil.rmtree(work, ignore_errors=True)
    log.info("published and activated %s (parent %s): %s", record.version, active, decision["why"])
    return dict(summary, status="published", version=record.version, parent=active, metrics=metrics, run=digest,
                training=asdict(training))

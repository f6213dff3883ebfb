"""Dynamic Layer-wise Distillation end to end, on reduced models (256 px vit_test teacher, lightening_test
student) and real COCO images: loss falls and fidelity rises, the feature cache is exact and spares the
teacher, decoder alignment fits ground truth, kill -9 resumes to the same weights, torchrun with gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samlight.checkpoints import load_student
from samlight.models import ModelSpec
from samlight.distill import FineTuneConfig, TrainingSample, coco_dataset, fine_tune
from samlight.eval import evaluate_samples, fidelity
from samlight.modeling import build_student, seeded, student_config
from samlight.modeling.build import init_decoder_from

REPO = Path(__file__).resolve().parents[1]
TEACHER = "random:vit_test"


@pytest.fixture(scope="module")
def train_json(coco_tiny) -> Path:
    return coco_tiny / "annotations" / "instances_train2017.json"


@pytest.fixture(scope="module")
def train_samples(train_json):
    return coco_dataset(train_json, max_images=8)


@pytest.fixture(scope="module")
def val_samples(coco_tiny):
    return coco_dataset(coco_tiny / "annotations" / "instances_val2017.json", max_images=3)


@pytest.fixture(scope="module")
def teacher():
    return ModelSpec.random("vit_test").load()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_student(path).model.state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, train_samples, val_samples, teacher):
    out = tmp_path_factory.mktemp("encoder_run")
    undistilled = seeded(0, build_student, student_config("lightening_test"))
    init_decoder_from(undistilled, teacher)  # exactly the student fine_tune starts from
    before = fidelity(undistilled, teacher, val_samples, device="cpu")
    config = FineTuneConfig(out_dir=str(out / "run"), encoder_steps=40, decoder_steps=0, batch_size=4, lr=2e-3,
                            cache_dir=str(out / "cache"), progress=False, checkpoint_every=20)
    path = fine_tune("lightening_test", TEACHER, train_samples, config)
    after = fidelity(load_student(path).model, teacher, val_samples, device="cpu")
    return {"path": path, "out": out / "run", "before": before, "after": after}


@pytest.mark.slow
def test_distillation_loss_falls_and_fidelity_rises_on_held_out_images(encoder_run):
    records = [json.loads(line) for line in (encoder_run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(40))
    first, last = records[:5], records[-5:]
    neck = lambda rs: np.mean([r["neck_loss"] for r in rs])  # noqa: E731
    assert neck(last) < 0.5 * neck(first)
    assert np.mean([r["layer_losses"][0] for r in last]) < np.mean([r["layer_losses"][0] for r in first])
    before, after = encoder_run["before"], encoder_run["after"]
    # held-out val images, GT box prompts, student vs teacher
    assert after["embedding_rel_mse"] < 0.5 * before["embedding_rel_mse"]
    assert after["embedding_cosine"] > before["embedding_cosine"] + 0.3
    assert after["mask_iou"] > before["mask_iou"] + 0.05, (before, after)


@pytest.mark.slow  # the encoder_run fixture: 8 s
def test_layer_weights_are_logged_each_step_and_move_deeper(encoder_run):
    records = [json.loads(line) for line in (encoder_run["out"] / "metrics.jsonl").read_text().splitlines()]
    weights = np.array([r["layer_weights"] for r in records])
    assert weights.shape == (40, 2) and np.allclose(weights.sum(1), 1, atol=1e-5)
    assert weights[0, 0] > 0.9 and weights[-1, -1] > 0.9
    assert (np.diff(weights[:, -1]) >= -1e-9).all()
    for name in ("losses.png", "layer_weights.png"):
        assert (encoder_run["out"] / "plots" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # the encoder_run fixture: 8 s
def test_checkpoint_carries_teacher_identity_and_metrics(encoder_run):
    checkpoint = load_student(encoder_run["path"])
    meta = checkpoint.metadata
    assert checkpoint.config.name == "lightening_test"
    assert meta["teacher"] == "random:vit_test:0"
    assert meta["layer_mapping"] == [2, 4]  # ceil(l * 4 / 2)
    assert meta["metrics"]["encoder"]["step"] == 39 and "neck_loss" in meta["metrics"]["encoder"]
    assert meta["distill"]["encoder_steps"] == 40 and meta["images"] == 8
    # projections are train-only: nothing but the student's own modules is saved
    assert not [k for k in checkpoint.model.state_dict() if "projection" in k]


@pytest.mark.slow
def test_feature_cache_spares_the_teacher_and_changes_nothing(tmp_path, train_samples):
    samples = train_samples[:4]
    common = dict(encoder_steps=4, decoder_steps=2, batch_size=2, progress=False, instances_per_image=2)
    cold = fine_tune("lightening_test", TEACHER, samples,
                     FineTuneConfig(out_dir=str(tmp_path / "cold"), cache_dir=str(tmp_path / "cache"), **common))
    warm = fine_tune("lightening_test", TEACHER, samples,  # reads through the threaded loader
                     FineTuneConfig(out_dir=str(tmp_path / "warm"), cache_dir=str(tmp_path / "cache"), num_workers=2,
                                    **common))
    uncached = fine_tune("lightening_test", TEACHER, samples, FineTuneConfig(out_dir=str(tmp_path / "none"), **common))
    cold_meta, warm_meta = load_student(cold).metadata, load_student(warm).metadata
    assert cold_meta["metrics"]["encoder"]["teacher_images"] > 0 and cold_meta["feature_cache"]["misses"] > 0
    assert warm_meta["metrics"]["encoder"]["teacher_images"] == 0  # every image came from the cache
    assert warm_meta["metrics"]["encoder"]["cache_hits"] == 2
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8  # 4 images x (blocks, neck only)
    _assert_same_weights(cold, warm)  # deterministic with a seed, cached or not
    _assert_same_weights(cold, uncached)


def test_resident_features_run_the_teacher_once_per_image_and_change_nothing(tmp_path, train_samples):
    samples = train_samples[:4]
    common = dict(encoder_steps=6, decoder_steps=0, batch_size=2, progress=False)
    resident = fine_tune("lightening_test", TEACHER, samples,
                         FineTuneConfig(out_dir=str(tmp_path / "resident"), resident_features_gb=0.5, **common))
    recomputed = fine_tune("lightening_test", TEACHER, samples,
                           FineTuneConfig(out_dir=str(tmp_path / "recomputed"), resident_features_gb=0, **common))
    assert load_student(resident).metadata["metrics"]["encoder"]["teacher_images"] == 4  # 3 epochs, one teacher pass
    assert load_student(recomputed).metadata["metrics"]["encoder"]["teacher_images"] == 12
    _assert_same_weights(resident, recomputed)


@pytest.mark.slow  # four short runs: 4-6 s
def test_augmented_views_are_new_to_the_teacher_and_snapshots_follow_the_run(tmp_path, train_samples):
    samples = train_samples[:4]
    config = FineTuneConfig(out_dir=str(tmp_path / "run"), encoder_steps=6, decoder_steps=0, batch_size=2,
                            augment=1.0, snapshot_every=2, resident_features_gb=0.5, cache_dir=str(tmp_path / "cache"),
                            progress=False)
    path = fine_tune("lightening_test", TEACHER, samples, config)
    meta = load_student(path).metadata
    assert meta["metrics"]["encoder"]["teacher_images"] == 12  # every view is a new image: none kept, none cached
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    snapshots = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snapshots == ["encoder-000002", "encoder-000004", "encoder-000006"]
    _assert_same_weights(path, tmp_path / "run" / "snapshots" / "encoder-000006")
    again = fine_tune("lightening_test", TEACHER, samples,
                      FineTuneConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "again"), "snapshot_every": 0}))
    _assert_same_weights(path, again)  # the views are functions of seed and position
    plain = fine_tune("lightening_test", TEACHER, samples,
                      FineTuneConfig(**{**config.to_dict(), "out_dir": str(tmp_path / "plain"), "augment": 0.0}))
    assert not torch.equal(_weights(path)["image_encoder.patch_embed.proj.weight"],
                           _weights(plain)["image_encoder.patch_embed.proj.weight"])


@pytest.mark.slow
def test_output_loss_trains_the_encoder_through_the_frozen_decoder(tmp_path, train_samples, teacher):
    samples = train_samples[:4]
    common = dict(encoder_steps=4, decoder_steps=0, batch_size=2, augment=0.5, progress=False)
    masks = fine_tune("lightening_test", TEACHER, samples,
                      FineTuneConfig(out_dir=str(tmp_path / "masks"), output_weight=1.0, **common))
    features = fine_tune("lightening_test", TEACHER, samples,
                         FineTuneConfig(out_dir=str(tmp_path / "features"), **common))
    records = [json.loads(line) for line in (tmp_path / "masks" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["output_loss"] > 0 for r in records)
    assert all(r["loss"] > r["neck_loss"] + r["output_loss"] - 1e-6 for r in records)
    weights = _weights(masks)
    for name, value in teacher.mask_decoder.state_dict().items():  # the student's decoder stays the teacher's
        torch.testing.assert_close(weights["mask_decoder." + name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(weights["image_encoder.neck.0.weight"], _weights(features)["image_encoder.neck.0.weight"])
    again = fine_tune("lightening_test", TEACHER, samples,
                      FineTuneConfig(out_dir=str(tmp_path / "again"), output_weight=1.0, **common))
    _assert_same_weights(masks, again)  # the random prompts are functions of seed and step


@pytest.mark.slow
def test_decoder_alignment_fits_ground_truth_box_prompts(tmp_path, train_samples, encoder_run):
    samples = train_samples[:4]
    before = evaluate_samples(load_student(encoder_run["path"]).model, samples, "box", device="cpu")["miou"]
    config = FineTuneConfig(out_dir=str(tmp_path / "dec"), encoder_steps=0, decoder_steps=80, batch_size=2,
                            decoder_lr=1e-3, warmup_fraction=0.1, box_fraction=1.0, teacher_loss_weight=0.0,
                            instances_per_image=4, progress=False)
    path = fine_tune(encoder_run["path"], TEACHER, samples, config)
    after = evaluate_samples(load_student(path).model, samples, "box", device="cpu")["miou"]
    assert after > before + 0.05 and after > 1.5 * before, (before, after)
    meta = load_student(path).metadata
    assert meta["student_origin"].startswith("lightening_test-")  # fine-tuned from the distilled checkpoint
    records = [json.loads(line) for line in (tmp_path / "dec" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["gt_loss"] for r in records[-10:]]) < np.mean([r["gt_loss"] for r in records[:10]])


def test_unfreezing_trains_the_last_blocks_only_with_grad_accumulation(tmp_path, train_samples):
    start = tmp_path / "start"
    fine_tune("lightening_test", TEACHER, train_samples[:2], FineTuneConfig(
        out_dir=str(start), encoder_steps=1, decoder_steps=0, batch_size=1, progress=False))
    # programmatic samples, as the training workers pass them: arrays, masks, and one image with boxes only
    image = train_samples[0].load_image()
    masks = train_samples[0].load_masks()
    samples = [TrainingSample(image=image, key="a", masks=masks),
               TrainingSample(image=train_samples[1].image, boxes=[[10, 10, 200, 150]])]
    path = fine_tune(start / "student", TEACHER, samples, FineTuneConfig(
        out_dir=str(tmp_path / "dec"), encoder_steps=0, decoder_steps=3, batch_size=1, grad_accum=2,
        unfreeze_blocks=1, decoder_lr=1e-3, progress=False))
    before, after = _weights(start / "student"), _weights(path)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(n.startswith("image_encoder.blocks.1.") for n in changed)
    assert any(n.startswith("image_encoder.neck.") for n in changed)
    assert any(n.startswith("mask_decoder.") for n in changed)
    assert not any(n.startswith(("image_encoder.blocks.0.", "image_encoder.patch_embed", "prompt_encoder."))
                   for n in changed)
    records = [json.loads(line) for line in (tmp_path / "dec" / "metrics.jsonl").read_text().splitlines()]
    assert [r["unfrozen_blocks"] for r in records] == [1, 1, 1]


def _cli(out: Path, train_json: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", TEACHER, "--student", "lightening_test", "--coco", str(train_json),
            "--max-images", "4", "--batch-size", "2", "--instances-per-image", "2", "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_uninterrupted_result(tmp_path, train_json, train_samples):
    steps = ["--encoder-steps", "30", "--decoder-steps", "4", "--checkpoint-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "samlight.cli", *_cli(tmp_path / "killed", train_json, *steps)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "killed" / "state" / "train_state.pt"
    deadline = time.monotonic() + 180
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "student").exists()
    saved = torch.load(state, weights_only=False)
    assert saved["stage"] == "encoder" and 3 <= saved["step"] < 30
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming encoder stage" in resumed.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the subprocesses
    try:
        reference = fine_tune("lightening_test", TEACHER, train_samples[:4], FineTuneConfig(
            out_dir=str(tmp_path / "straight"), encoder_steps=30, decoder_steps=4, batch_size=2,
            instances_per_image=2, progress=False))
    finally:
        torch.set_num_threads(threads)
    _assert_same_weights(tmp_path / "killed" / "student", reference)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("encoder", s) for s in range(30)] + [
        ("decoder", s) for s in range(4)]


@pytest.mark.slow
def test_torchrun_ddp_gloo_two_processes(tmp_path, train_json):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "samlight.cli",
         *_cli(out, train_json, "--encoder-steps", "3", "--decoder-steps", "2", "--batch-size", "1",
               "--grad-accum", "2", "--cache-dir", str(tmp_path / "cache"))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("encoder", 0), ("encoder", 1), ("encoder", 2),
                                                         ("decoder", 0), ("decoder", 1)]
    # one image per micro-batch, two micro-batches per step, on each of 2 ranks
    assert all(r["images"] == 4 for r in records if r["stage"] == "encoder")
    checkpoint = load_student(out / "student")
    assert checkpoint.metadata["teacher"] == "random:vit_test:0"


def test_official_checkpoint_teacher_is_identified_by_its_hash(tmp_path, train_samples, teacher):
    weights = tmp_path / "sam_vit_test.pth"
    torch.save(teacher.state_dict(), weights)
    path = fine_tune("lightening_test", f"vit_test:{weights}", train_samples[:1], FineTuneConfig(
        out_dir=str(tmp_path / "run"), encoder_steps=1, decoder_steps=1, batch_size=1, progress=False,
        cache_dir=str(tmp_path / "cache")))
    identity = load_student(path).metadata["teacher"]
    assert identity.startswith("vit_test:sha256=") and len(identity) == len("vit_test:sha256=") + 16
    # another teacher in the same output directory is refused rather than silently mixed
    with pytest.raises(ValueError, match="distilled from"):
        fine_tune("lightening_test", TEACHER, train_samples[:1], FineTuneConfig(
            out_dir=str(tmp_path / "run"), encoder_steps=1, decoder_steps=1, batch_size=1, progress=False))


@pytest.mark.slow  # four short runs: 4-6 s
def test_a_resume_with_other_settings_is_refused_unless_restarted(tmp_path, train_samples):
    """An unfinished run resumes only under the settings and images it started with; --restart starts over."""
    samples = train_samples[:2]

    def config(**changes) -> FineTuneConfig:
        return FineTuneConfig(**{"out_dir": str(tmp_path / "run"), "encoder_steps": 2, "decoder_steps": 0,
                                 "batch_size": 1, "checkpoint_every": 1, "progress": False, **changes})

    fine_tune("lightening_test", TEACHER, samples, config())
    state_path = tmp_path / "run" / "state" / "train_state.pt"
    state = torch.load(state_path, weights_only=False)
    state.update(stage="encoder", step=1)  # as if interrupted after the first step
    torch.save(state, state_path)
    with pytest.raises(ValueError, match=r"encoder_steps 2 → 6; batch_size 1 → 2\. .*--restart"):
        fine_tune("lightening_test", TEACHER, samples, config(encoder_steps=6, batch_size=2))
    with pytest.raises(ValueError, match=r"training images \(2 → 1"):
        fine_tune("lightening_test", TEACHER, samples[:1], config())
    # practicalities may change; --restart runs the new settings from the start
    assert fine_tune("lightening_test", TEACHER, samples, config(checkpoint_every=5)).is_dir()
    fine_tune("lightening_test", TEACHER, samples, config(encoder_steps=3, restart=True))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "encoder"] == [0, 1, 2]

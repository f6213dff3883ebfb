"""The distillation recipe on one GPU: fidelity to the teacher vs steps and minutes, on images the run never saw;
and the encoder stage's images/s with a big teacher.

    python bench/distill_recipe.py --out OUT --data COCO_TINY [--phases recipe,throughput] [flags]

profile: the recipe's encoder steps under the torch profiler (OUT/distill_profile.txt).
recipe: ``lightening_t`` from ``random:vit_b`` on coco_tiny train + val minus the first ``--holdout`` val images
(held out). A short probe run measures images/s, which sets the step count that fills ``--budget-min``; the
run saves a student snapshot every ``steps / --snapshots`` steps, and each snapshot's mask IoU to the teacher
(box and one-point prompts) and embedding cosine on the held-out images are measured afterwards. A run longer
than one device call: cut the first call (``timeout``), then call again with ``--resume`` on the same warm
machine: the run continues from its last checkpoint (``--checkpoint-every``) with the first call's step count,
and its minutes count training time only (the gap between the calls is left out). ``--resume --eval-only``
trains no more and measures the snapshots the run has saved (a run cut before its curve).
throughput: ``random:vit_h`` teacher, the whole encoder stage per step (loader, teacher features, student
forward and backward): teacher features kept on the GPU (the first epoch runs the teacher), and from a
warm disk cache with nothing kept on the GPU.

Results: OUT/distill_recipe.json (rewritten after every phase) and OUT/distill_recipe_curve.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.phases import PhasedRun  # noqa: E402

TARGETS = {"box_iou": 0.93, "point_iou": 0.85, "cosine": 0.97}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", required=True, help="coco_tiny root: annotations/, train2017/, val2017/")
    p.add_argument("--work", default="runs/distill_recipe", help="scratch (git-ignored; kept on a warm machine)")
    p.add_argument("--phases", default="recipe,throughput")
    p.add_argument("--teacher", default="random:vit_b")
    p.add_argument("--big-teacher", default="random:vit_h")
    p.add_argument("--student", default="lightening_t")
    p.add_argument("--holdout", type=int, default=20, help="first N val images: never trained on, measured on")
    p.add_argument("--budget-min", type=float, default=13.0, help="training minutes the step count is set to fill")
    p.add_argument("--steps", type=int, help="fixed step count instead of the budget")
    p.add_argument("--probe-steps", type=int, default=40)
    p.add_argument("--snapshots", type=int, default=6)
    p.add_argument("--checkpoint-every", type=int, default=100, help="recipe run: steps between resumable states")
    p.add_argument("--resume", action="store_true", help="continue the recipe run in --work (see above)")
    p.add_argument("--eval-only", action="store_true",
                   help="with --resume: no more training, measure the snapshots the run has saved")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--augment", type=float, default=0.5)
    p.add_argument("--neck-weight", type=float, default=1.0)
    p.add_argument("--layer-sigma", type=float, default=0.25)
    p.add_argument("--output-weight", type=float, default=0.3,
                   help="encoder stage: weight of the masks' loss through the frozen decoder (0: features only)")
    p.add_argument("--output-prompts", type=int, default=8)
    p.add_argument("--decoder-steps", type=int, default=150,
                   help="then the decoder learns the teacher's masks from the student's embeddings")
    # 2e-4 lowered held-out fidelity on CPU-sized models (box 0.848 -> 0.839), 5e-5 raised it (0.854): see
    # docs/benchmarks.md, "The recipe"
    p.add_argument("--decoder-lr", type=float, default=5e-5)
    p.add_argument("--num-workers", type=int, default=12)
    p.add_argument("--throughput-steps", type=int, default=40)
    p.add_argument("--profile-steps", type=int, default=24)
    return p.parse_args(argv)


def median_rate(records: list[dict], skip: int) -> float:
    timed = records[skip:] or records
    return statistics.median(r["images_per_s"] for r in timed)


def training_clock(records: list[dict], started: float, resume_gap_s: float = 30.0) -> list[float]:
    """Seconds of training at each record: wall time between consecutive steps, except that a gap longer than
    ``resume_gap_s`` (a run stopped and resumed) counts as the step's own duration."""
    clock, previous, total = [], started, 0.0
    for r in records:
        delta = r["time"] - previous
        total += delta if 0 <= delta <= resume_gap_s else r["images"] / r["images_per_s"]
        clock.append(total)
        previous = r["time"]
    return clock


class Recipe(PhasedRun):
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        super().__init__(self.out / "distill_recipe.json", {
            "args": vars(args), "device": device, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "targets": TARGETS})

    def data(self):
        from samlight.distill import coco_dataset

        root = Path(self.args.data) / "annotations"
        val = coco_dataset(root / "instances_val2017.json")
        train = coco_dataset(root / "instances_train2017.json") + val[self.args.holdout:]
        return train, val[: self.args.holdout]

    def config(self, name: str, steps: int, keep: bool = False, **changes):
        from samlight.distill import FineTuneConfig

        out = self.work / name
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        a = self.args
        settings = dict(out_dir=str(out), encoder_steps=steps, decoder_steps=0, batch_size=a.batch_size, lr=a.lr,
                        augment=a.augment, neck_weight=a.neck_weight, layer_sigma=a.layer_sigma,
                        output_weight=a.output_weight, output_prompts=a.output_prompts,
                        num_workers=a.num_workers, checkpoint_every=max(50, steps // 10), progress=False)
        settings.update(changes)
        return FineTuneConfig(**settings)

    @staticmethod
    def records(config) -> list[dict]:
        return [json.loads(line) for line in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]

    def phase_recipe(self) -> None:
        from samlight.checkpoints import load_student
        from samlight.distill import fine_tune
        from samlight.eval import fidelity
        from samlight.models import ModelSpec
        from samlight.modeling import build_student, seeded, student_config
        from samlight.modeling.build import init_decoder_from
        from samlight.predictor import Predictor

        a = self.args
        train, held = self.data()
        spec = ModelSpec.parse(a.teacher)
        teacher = spec.load()
        result = {"teacher": a.teacher, "student": a.student, "train_images": len(train), "held_out_images": len(held)}
        self.results["recipe"] = result
        plan_path = self.work / "recipe_plan.json"
        resuming = a.resume and plan_path.exists()
        if a.eval_only and not resuming:  # else a fallback measurement would start a whole new run
            raise SystemExit(f"--eval-only needs --resume and a run in {self.work} ({plan_path.name} not found)")
        if resuming:  # the first call's step count, probe and start
            result.update(json.loads(plan_path.read_text()))
            print(f"resuming the recipe run of {result['steps']} steps", flush=True)
        else:
            steps = a.steps
            if steps is None:
                probe = self.config("probe", a.probe_steps)
                fine_tune(a.student, spec, train, probe, teacher=teacher)
                rate = median_rate(self.records(probe), skip=5)
                steps = max(a.snapshots, int(a.budget_min * 60 * rate / a.batch_size))
                result["probe_images_per_s"] = rate
            result.update(steps=steps, started=time.time())
            plan_path.write_text(json.dumps({k: result[k] for k in ("steps", "started", "probe_images_per_s")
                                             if k in result}))
        steps, started = result["steps"], result["started"]
        self.save()
        run = self.config("run", steps, keep=resuming, snapshot_every=max(1, steps // a.snapshots),
                          decoder_steps=a.decoder_steps, decoder_lr=a.decoder_lr, teacher_loss_weight=1.0,
                          gt_loss_weight=0.0, iou_loss_weight=0.0, checkpoint_every=a.checkpoint_every)
        if not (resuming and a.eval_only):
            fine_tune(a.student, spec, train, run, teacher=teacher)
        records = self.records(run)
        clock = training_clock(records, started)
        result["run_minutes"] = clock[-1] / 60
        encoder = [r for r in records if r["stage"] == "encoder"]
        result["median_images_per_s"] = median_rate(encoder, skip=5)
        result["median_data_wait_s"] = statistics.median(r["data_wait_s"] for r in encoder)
        result["loss_first_last"] = [records[0]["loss"], records[-1]["loss"]]
        self.save()

        # the curve: step 0 is the undistilled student (seeded init, decoder copied from the teacher)
        initial = seeded(run.seed, build_student, student_config(a.student))
        init_decoder_from(initial, teacher)
        snapshots = [(0, 0.0, initial)]
        at = {r["step"] + 1: seconds for r, seconds in zip(records, clock) if r["stage"] == "encoder"}
        for path in sorted((Path(run.out_dir) / "snapshots").glob("encoder-*")):
            step = int(path.name.split("-")[1])
            snapshots.append((step, at[step] / 60, load_student(path).model))
        finished = Path(run.out_dir) / "student"
        if a.decoder_steps and finished.is_dir():  # the finished student: encoder steps, then decoder alignment
            snapshots.append((steps + a.decoder_steps, result["run_minutes"],
                              load_student(finished).model))
        teacher_predictor = Predictor(teacher)
        curve = result["curve"] = []  # saved point by point: a run cut short keeps what it measured
        for step, minutes, model in snapshots:
            point = {"step": step, "minutes": round(minutes, 3)}
            for prompt in ("box", "point"):
                f = fidelity(model, teacher, held, prompt=prompt, teacher_predictor=teacher_predictor)
                point[f"{prompt}_iou"] = f["mask_iou"]
                point["cosine"], point["rel_mse"], point["prompts_" + prompt] = (
                    f["embedding_cosine"], f["embedding_rel_mse"], f["prompts"])
            curve.append(point)
            self.save()
            print(json.dumps(point), flush=True)
        final = curve[-1]
        result["targets_met"] = {name: final[name] >= target for name, target in TARGETS.items()}
        first = {name: next((p["minutes"] for p in curve if p[name] >= target), None) for name, target in TARGETS.items()}
        result["minutes_to_target"] = first
        self.save()
        self.plot(curve)

    def plot(self, curve: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # top: the whole curve; bottom: the same zoomed on the targets, where the steps that matter are
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
        for row, ylim in ((0, (0.0, 1.0)), (1, (0.84, 1.0))):
            for ax, x in zip(axes[row], ("step", "minutes")):
                for name, colour in (("box_iou", "tab:blue"), ("point_iou", "tab:orange"), ("cosine", "tab:green")):
                    ax.plot([p[x] for p in curve], [p[name] for p in curve], "o-", color=colour, label=name)
                    ax.axhline(TARGETS[name], color=colour, linestyle=":", linewidth=1)
                ax.set_ylim(*ylim)
                ax.grid(alpha=0.3)
        axes[1][0].set_xlabel("step")
        axes[1][1].set_xlabel("minutes of one GPU")
        axes[0][0].set_ylabel("fidelity to the teacher (held-out images)")
        axes[1][0].set_ylabel("zoomed")
        if self.args.decoder_steps:
            axes[0][0].set_title(f"last point: after {self.args.decoder_steps} decoder-alignment steps", fontsize=9)
        axes[1][0].legend(loc="lower right")
        fig.suptitle(f"{self.args.student} from {self.args.teacher} on {self.results['device']} "
                     f"(dotted: targets)")
        fig.tight_layout()
        fig.savefig(self.out / "distill_recipe_curve.png", dpi=110)
        plt.close(fig)

    def phase_profile(self) -> None:
        """Where an encoder step's time goes: the recipe's settings for ``--profile-steps`` steps under the torch
        profiler (the first epoch, which runs the teacher on every image, included), the top kernels and ops by
        GPU time in OUT/distill_profile.txt, the loader's wait per step in the results."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        from samlight.distill import fine_tune
        from samlight.models import ModelSpec

        a = self.args
        train, _ = self.data()
        spec = ModelSpec.parse(a.teacher)
        teacher = spec.load()
        config = self.config("profile", a.profile_steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            fine_tune(a.student, spec, train, config, teacher=teacher)
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        (self.out / "distill_profile.txt").write_text(table)
        print(table[:6000], flush=True)
        records = self.records(config)
        self.results["profile"] = {
            "steps": len(records),
            "step_s": [round(r["images"] / r["images_per_s"], 4) for r in records],
            "data_wait_s": [round(r["data_wait_s"], 4) for r in records],
            "teacher_images": records[-1]["teacher_images"],
        }
        self.save()

    def phase_throughput(self) -> None:
        from samlight.distill import fine_tune
        from samlight.models import ModelSpec

        a = self.args
        train, _ = self.data()
        train = train[:80]
        spec = ModelSpec.parse(a.big_teacher)
        teacher = spec.load()
        epoch = -(-len(train) // a.batch_size)
        steps = max(a.throughput_steps, 2 * epoch + 5)  # past the first epoch, which the teacher pays for
        out = {"teacher": a.big_teacher, "student": a.student, "batch_size": a.batch_size, "images": len(train)}
        self.results["throughput"] = out
        cache = self.work / "cache_vit_h"
        shutil.rmtree(cache, ignore_errors=True)
        runs = {
            # the teacher runs in the first epoch, its features stay on the GPU
            "resident": self.config("vit_h_resident", steps, augment=0.0, resident_features_gb=16),
            # writes the disk cache (teacher every step of one epoch), then read from it with nothing kept on the GPU
            "disk_cold": self.config("vit_h_cold", epoch, augment=0.0, cache_dir=str(cache), resident_features_gb=0),
            "disk_warm": self.config("vit_h_warm", steps, augment=0.0, cache_dir=str(cache),
                                     resident_features_gb=0),
        }
        for name, config in runs.items():
            started = time.time()
            fine_tune(a.student, spec, train, config, teacher=teacher)
            records = self.records(config)
            after_first_epoch = records[epoch + 1:] if name != "disk_cold" else records[1:]
            out[name] = {
                "steps": len(records), "wall_s": round(time.time() - started, 1),
                "teacher_images": records[-1]["teacher_images"],
                "images_per_s_first_epoch": statistics.median(r["images_per_s"] for r in records[1:epoch] or records),
                "images_per_s_after_first_epoch": statistics.median(r["images_per_s"] for r in after_first_epoch),
            }
            print(name, json.dumps(out[name]), flush=True)
            self.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = Recipe(args)
    status = recipe.run_phases(args.phases)
    print(json.dumps({k: recipe.results.get(k) for k in ("recipe", "throughput", "errors")}, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())

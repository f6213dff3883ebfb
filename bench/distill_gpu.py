"""GPU run of Dynamic Layer-wise Distillation and its evaluation (one H100, about 8 minutes).

    python bench/distill_gpu.py --out OUT --data COCO_TINY [--phases 1,2,3] [step flags]

1. distil ``lightening_t`` from ``random:vit_b`` on coco_tiny train (encoder stage); ``samlight eval``
   on val before and after: box-prompt mask IoU vs the teacher, embedding cosine / relative MSE.
2. decoder alignment of the distilled student on coco_tiny train ground truth; box-prompt mIoU on val
   before and after.
3. encoder-stage images/s with a ``random:vit_h`` teacher: no feature cache, cold cache, warm cache.

Phase 2 starts from phase 1's student in --work (default runs/distill_gpu, git-ignored, so it survives
between calls on a warm machine): to stay under a 10-minute command limit, run ``--phases 1,2`` and then
``--phases 3`` as two calls. Fewer steps: --encoder-steps / --decoder-steps / --throughput-steps.

Everything goes through the ``samlight`` CLI (subprocesses). Results: OUT/distill_gpu.json (rewritten
after every step, so a run cut short still reports what it did) and a few PNGs (at most 8 files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.phases import PhasedRun  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results directory (JSON + PNGs)")
    p.add_argument("--data", required=True, help="coco_tiny root: annotations/, train2017/, val2017/")
    p.add_argument("--work", default="runs/distill_gpu",
                   help="scratch: checkpoints, runs, feature caches (runs/ is git-ignored: kept on a warm machine)")
    p.add_argument("--phases", default="1,2,3")
    p.add_argument("--teacher", default="random:vit_b")
    p.add_argument("--big-teacher", default="random:vit_h")
    p.add_argument("--student", default="lightening_t")
    p.add_argument("--encoder-steps", type=int, default=600)
    p.add_argument("--decoder-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--teacher-loss-weight", type=float, default=0.1,
                   help="decoder stage: a random teacher's logits are noise")
    p.add_argument("--box-fraction", type=float, default=0.75)
    p.add_argument("--unfreeze-blocks", type=int, default=0)
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--max-train-images", type=int)
    p.add_argument("--max-val-images", type=int)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--device")
    return p.parse_args(argv)


class Bench(PhasedRun):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        data = Path(args.data)
        self.train = data / "annotations" / "instances_train2017.json"
        self.val = data / "annotations" / "instances_val2017.json"
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        super().__init__(self.out / "distill_gpu.json", {"args": vars(args), "device": device,
                                                         "torch": torch.__version__})

    def cli(self, name: str, *argv: str) -> None:
        """Run ``samlight ARGV`` through ``PhasedRun.call``."""
        command = [sys.executable, "-m", "samlight.cli", "--log-level", "WARNING", *argv]
        if self.args.device:
            command += ["--device", self.args.device]
        self.call(name, command)

    def coco(self, annotations: Path, limit: int | None) -> list[str]:
        return ["--coco", str(annotations)] + (["--max-images", str(limit)] if limit else [])

    def evaluate(self, name: str, checkpoint: Path, grid: str | None = None) -> dict:
        json_path = self.work / f"eval_{name}.json"
        argv = ["eval", "--checkpoint", str(checkpoint), *self.coco(self.val, self.args.max_val_images),
                "--prompt", "box", "--teacher", self.args.teacher, "--json", str(json_path), "--no-progress"]
        if grid:
            argv += ["--grid", str(self.out / grid), "--examples", "6"]
        self.cli(f"eval_{name}", *argv)
        result = json.loads(json_path.read_text())
        summary = {"box_miou": result["miou"], "instances": result["instances"], "by_size": result["by_size"],
                   "fidelity": result.get("fidelity"), "model": result["model"]}
        self.results.setdefault("evals", {})[name] = summary
        self.save()
        return summary

    def distill(self, name: str, *argv: str, teacher: str | None = None, student: str | None = None) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        self.cli(name, "distill", "--teacher", teacher or self.args.teacher, "--student", student or self.args.student,
                 *self.coco(self.train, self.args.max_train_images), "--out", str(out), "--no-progress",
                 "--batch-size", str(self.args.batch_size), "--num-workers", str(self.args.num_workers), *argv)
        return out

    @staticmethod
    def records(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # phases

    def undistilled(self) -> Path:
        """The student before distillation: seeded init, prompt encoder and decoder copied from the teacher."""
        from samlight.checkpoints import save_student
        from samlight.models import ModelSpec
        from samlight.modeling import build_student, seeded, student_config
        from samlight.modeling.build import init_decoder_from

        path = self.work / "undistilled"
        config = student_config(self.args.student)
        spec = ModelSpec.parse(self.args.teacher)
        model = seeded(0, build_student, config)
        init_decoder_from(model, spec.load())
        save_student(model, config, path, {"teacher": spec.identity, "note": "undistilled initialisation"})
        return path

    def phase_1(self) -> None:
        before = self.evaluate("undistilled", self.undistilled())
        run = self.distill("distill_vit_b", "--encoder-steps", str(self.args.encoder_steps), "--decoder-steps", "0",
                           "--lr", str(self.args.lr), "--cache-dir", str(self.work / "cache_vit_b"))
        after = self.evaluate("distilled", run / "student", grid="grid_distilled.png")
        records = self.records(run)
        self.results["phase1"] = {
            "teacher": self.args.teacher, "student": self.args.student, "encoder_steps": self.args.encoder_steps,
            "mask_iou_vs_teacher": {"before": before["fidelity"]["mask_iou"], "after": after["fidelity"]["mask_iou"]},
            "embedding_cosine": {"before": before["fidelity"]["embedding_cosine"],
                                 "after": after["fidelity"]["embedding_cosine"]},
            "embedding_rel_mse": {"before": before["fidelity"]["embedding_rel_mse"],
                                  "after": after["fidelity"]["embedding_rel_mse"]},
            "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
            "neck_loss_first_last": [records[0]["neck_loss"], records[-1]["neck_loss"]],
            "median_images_per_s": statistics.median(r["images_per_s"] for r in records[2:] or records),
        }
        for plot in ("losses.png", "layer_weights.png"):
            shutil.copy(run / "plots" / plot, self.out / f"encoder_{plot}")
        self.save()

    def phase_2(self) -> None:
        distilled = self.work / "distill_vit_b" / "student"
        if not distilled.is_dir():
            raise RuntimeError("phase 2 needs phase 1's distilled student")
        before = self.results.get("evals", {}).get("distilled") or self.evaluate("distilled", distilled)
        run = self.distill("align", "--encoder-steps", "0", "--decoder-steps", str(self.args.decoder_steps),
                           "--decoder-lr", str(self.args.decoder_lr), "--teacher-loss-weight",
                           str(self.args.teacher_loss_weight), "--box-fraction", str(self.args.box_fraction),
                           "--unfreeze-blocks", str(self.args.unfreeze_blocks), "--warmup-fraction", "0.05",
                           "--cache-dir", str(self.work / "cache_vit_b"), student=str(distilled))
        after = self.evaluate("aligned", run / "student", grid="grid_aligned.png")
        records = self.records(run)
        self.results["phase2"] = {
            "decoder_steps": self.args.decoder_steps,
            "box_miou_val": {"before": before["box_miou"], "after": after["box_miou"]},
            "by_size_after": after["by_size"],
            "mask_iou_vs_teacher_after": after["fidelity"]["mask_iou"],
            "train_gt_iou_first_last_50": [statistics.mean(r["gt_iou"] for r in records[:50]),
                                           statistics.mean(r["gt_iou"] for r in records[-50:])],
            "median_images_per_s": statistics.median(r["images_per_s"] for r in records[2:] or records),
        }
        shutil.copy(run / "plots" / "losses.png", self.out / "decoder_losses.png")
        self.save()

    def phase_3(self) -> None:
        steps = self.args.throughput_steps
        cache = self.work / "cache_vit_h"
        shutil.rmtree(cache, ignore_errors=True)
        images = self.args.max_train_images or 80
        fill_steps = max(1, -(-images // self.args.batch_size))  # one epoch: every image a miss
        runs = {
            "no_cache": self.distill("vit_h_no_cache", "--encoder-steps", str(steps), "--decoder-steps", "0",
                                     teacher=self.args.big_teacher),
            "cache_cold": self.distill("vit_h_cache_cold", "--encoder-steps", str(fill_steps), "--decoder-steps", "0",
                                       "--cache-dir", str(cache), teacher=self.args.big_teacher),
            "cache_warm": self.distill("vit_h_cache_warm", "--encoder-steps", str(steps), "--decoder-steps", "0",
                                       "--cache-dir", str(cache), teacher=self.args.big_teacher),
        }
        out = {"teacher": self.args.big_teacher, "student": self.args.student, "batch_size": self.args.batch_size}
        for name, run in runs.items():
            records = self.records(run)
            timed = records[2:] if len(records) > 4 else records  # the first steps pay for warm-up
            out[name] = {
                "images_per_s_median": statistics.median(r["images_per_s"] for r in timed),
                "images_per_s_mean": (sum(r["images"] for r in timed)
                                      / sum(r["images"] / r["images_per_s"] for r in timed)),
                "steps": len(records), "teacher_images": records[-1]["teacher_images"],
                "cache_hits": sum(r["cache_hits"] for r in records),
            }
        out["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
        out["speedup_warm_vs_no_cache"] = (out["cache_warm"]["images_per_s_median"]
                                           / out["no_cache"]["images_per_s_median"])
        self.results["phase3"] = out
        self.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    status = bench.run_phases(args.phases)
    print(json.dumps({k: v for k, v in bench.results.items() if k.startswith("phase")}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())

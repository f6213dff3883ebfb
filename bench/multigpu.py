"""Several GPUs of one host: distributed DLD scaling and one inference worker per GPU (under 10 minutes).

    python bench/multigpu.py --out OUT --data COCO_TINY --redis-server PATH [--images DIR] [--phases distill,serve]

distill: encoder-stage DLD of ``lightening_t`` from ``random:vit_h`` on coco_tiny train, no feature cache
  (every step runs the teacher), three runs through the ``samlight`` CLI:
    1gpu     one GPU, --batch-size B
    Ngpu     ``torchrun --nproc_per_node N``, --batch-size B on each GPU (global batch N·B)
    1gpu_NB  one GPU, --batch-size N·B: the same samples per step as Ngpu, so the loss curves should overlap
  Scaling efficiency = images/s of Ngpu / (N × images/s of 1gpu). The Ngpu checkpoint is then verified and
  used by ``samlight predict`` on one GPU.
serve: bench/loadtest.py with 1 inference worker on GPU 0, then one worker per GPU, against one redis-server
  started here; the same simulated annotators (prewarm on task open, so routing decides the hit rate).

Results: OUT/multigpu.json (rewritten after every step) and OUT/multigpu_distill.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.phases import PhasedRun  # noqa: E402

# NVLink multicast stays off (device tool: it can take a shared host's GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="coco_tiny root")
    p.add_argument("--images", type=Path, help="task images for the load test (default DATA/val2017)")
    p.add_argument("--redis-server", help="redis-server binary (serve phase)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "multigpu")
    p.add_argument("--phases", default="distill,serve")
    p.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    p.add_argument("--teacher", default="random:vit_h")
    p.add_argument("--student", default="lightening_t")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=6)
    p.add_argument("--annotators", type=int, default=16)
    p.add_argument("--duration", type=float, default=40.0, help="seconds per load test")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check the script on CPU: --gpus processes/workers on the CPU (use tiny models)")
    return p.parse_args(argv)


class Run(PhasedRun):
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.gpus = args.gpus or torch.cuda.device_count()
        # worker device ids for the load test; -1 is the CPU
        self.device_ids = ["-1" if args.cpu_dry_run else str(i) for i in range(self.gpus)]
        if self.gpus < 2:
            raise SystemExit(f"bench/multigpu.py needs 2 or more GPUs, found {self.gpus}")
        self.env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        device = "cpu (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name(0)
        super().__init__(args.out / "multigpu.json", {"gpus": self.gpus, "device": device, "torch": torch.__version__,
                                                      "args": vars(args)})

    def run_command(self, name: str, command: list[str], visible: str | None = None) -> None:
        """``call`` from the repository, multicast off, on the GPUs ``visible`` names (default: all)."""
        env = self.env if visible is None else {**self.env, "CUDA_VISIBLE_DEVICES": visible}
        self.call(name, command, cwd=REPO, env=env)

    def samlight(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "samlight.cli", "--log-level", "WARNING", *argv]

    # distill

    def distill(self, name: str, gpus: int, batch_size: int) -> list[dict]:
        out = self.args.work / name
        shutil.rmtree(out, ignore_errors=True)
        argv = ["distill", "--teacher", self.args.teacher, "--student", self.args.student,
                "--coco", str(self.args.data / "annotations" / "instances_train2017.json"),
                "--out", str(out), "--no-progress", "--encoder-steps", str(self.args.steps), "--decoder-steps", "0",
                "--batch-size", str(batch_size), "--num-workers", str(self.args.num_workers)]
        if gpus == 1:
            self.run_command(name, self.samlight(*argv), visible="0")
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
            self.run_command(name, torchrun + ["-m", "samlight.cli", "--log-level", "WARNING", *argv],
                             visible=",".join(map(str, range(gpus))))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def phase_distill(self) -> None:
        b, n = self.args.batch_size, self.gpus
        runs = {"1gpu": self.distill("1gpu", 1, b), f"{n}gpu": self.distill(f"{n}gpu", n, b),
                f"1gpu_b{n * b}": self.distill(f"1gpu_b{n * b}", 1, n * b)}
        summary: dict = {"teacher": self.args.teacher, "student": self.args.student, "steps": self.args.steps,
                         "batch_size_per_gpu": b, "runs": {}}
        for name, records in runs.items():
            timed = records[3:]  # the first steps pay for cudnn/allocator warm-up
            summary["runs"][name] = {
                "images_per_s_median": round(statistics.median(r["images_per_s"] for r in timed), 2),
                "global_batch": records[0]["images"], "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
                "loss": [round(r["loss"], 5) for r in records]}
        single, multi = summary["runs"]["1gpu"], summary["runs"][f"{n}gpu"]
        summary["scaling_efficiency"] = round(multi["images_per_s_median"] / (n * single["images_per_s_median"]), 3)
        same_batch = summary["runs"][f"1gpu_b{n * b}"]["loss"]
        gaps = [abs(a - c) / max(abs(c), 1e-12) for a, c in zip(multi["loss"], same_batch)]
        summary["loss_vs_same_global_batch"] = {"max_rel_diff": round(max(gaps), 4),
                                                "median_rel_diff": round(statistics.median(gaps), 4),
                                                "correlation": round(statistics.correlation(multi["loss"], same_batch), 4)}
        self.results["distill"] = summary
        self.save()
        self.plot(summary)
        self.load_on_one_gpu(self.args.work / f"{n}gpu" / "student")

    def load_on_one_gpu(self, student: Path) -> None:
        image = sorted((self.args.data / "val2017").glob("*.jpg"))[0]
        self.run_command("verify_checkpoint", self.samlight("weights", "verify", str(student)), visible="0")
        mask = self.args.out / "multigpu_checkpoint_mask.png"
        device = "cpu" if self.args.cpu_dry_run else "cuda:0"
        self.run_command("predict_one_gpu", self.samlight(
            "predict", "--checkpoint", str(student), "--image", str(image), "--box", "100,100,400,300",
            "--out", str(mask), "--device", device), visible="0")
        self.results["checkpoint_on_one_gpu"] = {"student": str(student), "image": image.name,
                                                 "mask_png_bytes": mask.stat().st_size}
        self.save()

    def plot(self, summary: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, run in summary["runs"].items():
            left.plot(run["loss"], label=f"{name} (global batch {run['global_batch']})")
        left.set(xlabel="step", ylabel="DLD loss", title="encoder-stage loss", yscale="log")
        left.legend()
        names = list(summary["runs"])
        right.bar(names, [summary["runs"][k]["images_per_s_median"] for k in names], color="tab:blue")
        right.set(ylabel="images/s (median)", title=f"scaling efficiency {summary['scaling_efficiency']:.0%}")
        fig.suptitle(f"DLD {summary['student']} from {summary['teacher']} on {self.results['device']}")
        fig.tight_layout()
        fig.savefig(self.args.out / "multigpu_distill.png", dpi=110)
        plt.close(fig)

    # serve

    def phase_serve(self) -> None:
        if not self.args.redis_server:
            raise RuntimeError("the serve phase needs --redis-server")
        images = self.args.images or self.args.data / "val2017"
        serve: dict = {}
        for workers, gpus in ((1, self.device_ids[0]), (self.gpus, ",".join(self.device_ids))):
            report = self.args.work / f"loadtest-{workers}workers.json"
            self.run_command(f"loadtest_{workers}workers", [
                sys.executable, "bench/loadtest.py", "--spawn", "--python", sys.executable,
                "--redis-server", self.args.redis_server, "--images", str(images), "--random", self.args.student,
                "--max-images", "80", "--deadline-ms", "5000", "--duration", str(self.args.duration),
                "--workers", str(workers), f"--gpus={gpus}", "--annotators", str(self.args.annotators),
                "--tasks-per-annotator", "20", "--clicks", "8", "--open-ms", "200", "--out", str(report)])
            data = json.loads(report.read_text())
            serve[f"{workers}_workers"] = data
            shutil.copy(report, self.args.out / report.name)
        one, many = serve["1_workers"], serve[f"{self.gpus}_workers"]
        serve["throughput_ratio"] = round(many["throughput_clicks_per_s"] / one["throughput_clicks_per_s"], 3)
        self.results["serve"] = serve
        self.save()


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    status = run.run_phases(args.phases)
    print(json.dumps({k: run.results.get(k) for k in ("distill", "checkpoint_on_one_gpu", "errors")}, indent=1)[:4000])
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Load generator: N simulated annotators clicking through the Label Studio protocol against the backend.

Each annotator opens tasks one after another. Opening a task is what Label Studio does: a batch
``POST /predict`` with ``context: null`` (the backend prewarms the image's embedding; ``--no-prewarm`` skips
it), then ``--clicks`` smart-keypoint clicks, each a ``POST /predict`` with ``params.context.result`` holding
the keypoint in percent of ``original_width/height``, with ``--think-ms`` between clicks. Prints and writes
(``--out``, JSON) p50/p90/p99 latency (all clicks, first click on a task, follow-up clicks), throughput,
the fleet's embedding hit rate for clicks (from the workers' counters in Redis), errors and per-worker load.

Two modes:

* ``--spawn``: starts everything on this machine: redis-server (``--redis-server PATH``), a stand-in for
  Label Studio's file server (serves ``--images`` at ``/data/upload/<name>``, token-protected), ``--workers``
  RQ inference workers (``python -m workers.inference``; ``--gpus 0,0`` puts two on GPU 0) and the backend
  under gunicorn with ``REDIS_URL`` (``python -m backend.serve``), then stops them all.
* ``--backend URL``: an existing stack (``--redis-url`` for the hit rate; tasks' images must be reachable
  by it: ``--image-base`` is the URL prefix of the image names, e.g. ``/data/upload/1/``).

    python bench/loadtest.py --spawn --workers 2 --random lightening_test --annotators 4 \\
        --out bench/results/loadtest-cpu-$(date +%F).json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.labels import SMART_CONFIG  # noqa: E402  (the labeling config the README recommends)
from testbed import FileServer, RedisServer, free_port, wait_port  # noqa: E402

TOKEN = "loadtest-legacy-token"


@dataclass
class Stack:
    """Processes started by ``--spawn`` (stopped in reverse order)."""

    directory: Path
    processes: list = field(default_factory=list)
    files: FileServer | None = None
    backend_url: str = ""
    redis_url: str = ""

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "wb")
        # own process group: stopping the stack never signals this script
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each started process and its descendants (each started process leads its own
        session: gunicorn's workers and a worker's job processes count with it)."""
        sessions = {process.pid: name for name, process in self.processes}
        used = dict.fromkeys(sessions.values(), 0.0)
        tick_s = 1 / os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process exited meanwhile
                continue
            name = sessions.get(int(fields[3]))  # field 6 of stat: the session id
            if name is not None:
                used[name] += (int(fields[11]) + int(fields[12])) * tick_s  # utime + stime
        return used

    def stop(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.files is not None:
            self.files.close()


def spawn(args, images: Path) -> Stack:
    stack = Stack(Path(tempfile.mkdtemp(prefix="samlight-loadtest-")))
    redis_bin = args.redis_server or shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("no redis-server: pass --redis-server PATH")
    redis = RedisServer(stack.directory, binary=redis_bin, appendfsync="everysec")
    wait_port(redis.port, 15, "redis-server", stack.start("redis", redis.command(), dict(os.environ)))
    stack.redis_url = redis.url
    stack.files = FileServer(images, token=TOKEN)
    env = dict(os.environ, REDIS_URL=stack.redis_url, MODEL_DIR=str(stack.directory / "models"),
               LABEL_STUDIO_URL=stack.files.url, LABEL_STUDIO_API_KEY=TOKEN, PYTHONUNBUFFERED="1",
               SAMLIGHT_MAX_BATCH=str(args.max_batch), LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"))
    if args.deadline_ms:  # otherwise the deployment default
        env["SAMLIGHT_DEADLINE_MS"] = str(args.deadline_ms)
    if args.torch_threads:
        env.update(OMP_NUM_THREADS=str(args.torch_threads), MKL_NUM_THREADS=str(args.torch_threads))
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else ["-1"] * args.workers
    if len(gpus) != args.workers:
        raise SystemExit(f"--gpus lists {len(gpus)} devices for {args.workers} workers")
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--random", args.random]
    for index, gpu in enumerate(gpus):
        stack.start(f"worker{index}", [args.python, "-m", "workers.inference", "--gpu", gpu, *model,
                                       "--redis-url", stack.redis_url, "--name", f"lt-w{index}"], env)
    backend_port = free_port()
    backend_env = dict(env, SAMLIGHT_WORKERS=str(args.backend_processes))
    if args.backend_threads:  # otherwise the backend's default: what a deployment gets
        backend_env["SAMLIGHT_THREADS"] = str(args.backend_threads)
    stack.start("backend", [args.python, "-m", "backend.serve", "--port", str(backend_port), "--host", "127.0.0.1"],
                backend_env)
    stack.backend_url = f"http://127.0.0.1:{backend_port}"
    wait_port(backend_port, 120, "backend", stack.processes[-1][1])
    return stack


def wait_for_fleet(session: requests.Session, backend: str, workers: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    health = {}
    while time.monotonic() < deadline:
        try:
            health = session.get(f"{backend}/health", timeout=2).json()
            if len(health.get("workers", [])) >= workers:
                return health
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{workers} inference worker(s) not up within {timeout:.0f}s: {health}")


def fleet_counters(redis_url: str | None) -> dict:
    if not redis_url:
        return {}
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    prefix = os.environ.get("SAMLIGHT_REDIS_PREFIX", "samlight")
    counters = {}
    for key in client.scan_iter(f"{prefix}:infer:alive:*"):
        info = json.loads(client.get(key) or "{}")
        counters[key.decode().rsplit(":", 1)[-1]] = {k: info.get(k, 0) for k in ("jobs", "clicks", "click_hits")}
    client.close()
    return counters


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q):
        return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 2)

    return {"n": len(values), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "mean": round(statistics.fmean(values), 2), "max": round(ordered[-1], 2)}


@dataclass
class Click:
    ms: float
    first: bool
    ok: bool
    error: str = ""
    rle_bytes: int = 0  # the brush RLE's length: how complex the mask was (a random model's is noise)


def annotator(index: int, args, backend: str, tasks: list[dict], results: list, stop_at: float) -> None:
    session = requests.Session()
    rng = random.Random(args.seed * 1000 + index)
    auth = (args.basic_user, args.basic_pass) if args.basic_user else None
    order = tasks[index::args.annotators] or tasks
    position = 0
    while time.monotonic() < stop_at and position < args.tasks_per_annotator:
        task = order[position % len(order)]
        position += 1
        body = {"tasks": [task["task"]], "project": "1.1700000000", "label_config": SMART_CONFIG,
                "params": {"login": None, "password": None, "context": None}}
        if args.prewarm:
            try:
                session.post(f"{backend}/predict", json=body, auth=auth, timeout=30)
            except requests.RequestException:
                pass
            time.sleep(args.open_ms / 1000)
        for n in range(args.clicks):
            x, y = rng.uniform(10, 90), rng.uniform(10, 90)
            point = {"id": f"p{n}", "from_name": "point", "to_name": "image", "type": "keypointlabels",
                     "original_width": task["width"], "original_height": task["height"], "image_rotation": 0,
                     "is_positive": True, "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Object"]}}
            body["params"]["context"] = {"result": [point]}
            started = time.perf_counter()
            try:
                response = session.post(f"{backend}/predict", json=body, auth=auth, timeout=30)
                ms = (time.perf_counter() - started) * 1000
                rle_bytes = first_rle_length(response.content) if response.ok else 0
                ok = rle_bytes > 0
                error = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except (requests.RequestException, ValueError) as exc:
                ms, ok, error, rle_bytes = (time.perf_counter() - started) * 1000, False, str(exc)[:200], 0
            results.append(Click(ms, n == 0, ok, error, rle_bytes))
            if args.think_ms:
                time.sleep(rng.uniform(0.5, 1.5) * args.think_ms / 1000)


def first_rle_length(reply: bytes) -> int:
    """The length of the first brush RLE in a ``/predict`` reply (0: none), counted in the JSON text.

    Label Studio's RLE is a JSON list of byte values, ~90 K of them for a random model's noise mask; parsing that
    into Python ints cost the load generator ~20 ms per click, more than the backend spends on it, so the load
    it could offer, not the stack, set the ceiling. Counting the list's commas is C-speed."""
    key = reply.find(b'"rle":')
    if key < 0:
        return 0
    start = reply.find(b"[", key)
    end = reply.find(b"]", start)
    if start < 0 or end < 0:
        return 0
    return reply.count(b",", start, end) + 1 if reply[start + 1:end].strip() else 0


def annotators_in_threads(indices: list[int], args, backend: str, tasks: list[dict], stop_at: float) -> list[Click]:
    results: list[Click] = []
    threads = [threading.Thread(target=annotator, args=(i, args, backend, tasks, results, stop_at)) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def play(args, backend: str, tasks: list[dict], stop_at: float) -> list[Click]:
    """All annotators until ``stop_at``, in ``--load-processes`` processes: one Python process, its threads
    sharing one GIL for every request and reply, tops out long before a fleet of backends does."""
    processes = max(1, min(args.load_processes, args.annotators))
    groups = [list(range(p, args.annotators, processes)) for p in range(processes)]
    run = functools.partial(annotators_in_threads, args=args, backend=backend, tasks=tasks, stop_at=stop_at)
    if processes == 1:
        return run(groups[0])
    # fork: the children need nothing but the arguments; CLOCK_MONOTONIC (stop_at) is shared by all processes
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return [click for part in pool.map(run, groups) for click in part]


def build_tasks(images: Path, base: str, limit: int) -> list[dict]:
    from PIL import Image, ImageOps

    tasks = []
    for n, path in enumerate(sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))):
        if n >= limit:
            break
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
        tasks.append({"task": {"id": n + 1, "data": {"image": f"{base}{path.name}"}}, "width": width,
                      "height": height})
    if not tasks:
        raise SystemExit(f"no images in {images}")
    return tasks


def environment_info(args) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            # deployment defaults the spawned stack inherits (the mask clean-up, threads, ...)
            "settings": {key: value for key, value in os.environ.items() if key.startswith("SAMLIGHT_")}}
    try:
        out = subprocess.run([args.python, "-c", "import torch, json; print(json.dumps({'torch': torch.__version__, "
                              "'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"],
                             capture_output=True, text=True, timeout=120)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/loadtest.py", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--spawn", action="store_true", help="start redis, file server, workers and backend here")
    mode.add_argument("--backend", help="URL of a running backend")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="(--backend) for the hit rate")
    parser.add_argument("--image-base", default="/data/upload/", help="(--backend) URL prefix of the image names")
    parser.add_argument("--basic-user"), parser.add_argument("--basic-pass")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "coco_tiny" / "val2017")
    parser.add_argument("--max-images", type=int, default=40)
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--tasks-per-annotator", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=6, help="clicks per task")
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean pause between clicks")
    parser.add_argument("--open-ms", type=float, default=0.0, help="pause after opening a task (prewarm)")
    parser.add_argument("--no-prewarm", dest="prewarm", action="store_false")
    parser.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-processes", type=int, default=1,
                        help="processes the annotators are spread over (threads within each)")
    # --spawn
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus", default=None, help="one device per worker, e.g. 0,0 (default: CPU)")
    parser.add_argument("--random", default="lightening_t", help="random-weight config for the workers")
    parser.add_argument("--checkpoint", default=None, help="student dir or SAM .pth instead of --random")
    parser.add_argument("--redis-server", default=None, help="path of the redis-server binary")
    parser.add_argument("--python", default=sys.executable, help="interpreter for workers and backend")
    parser.add_argument("--deadline-ms", type=int, default=None, help="click deadline (default: the backend's)")
    parser.add_argument("--backend-threads", type=int, default=None, help="(default: the backend's)")
    parser.add_argument("--backend-processes", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--warmup-clicks", type=int, default=3, help="per worker, not measured")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    stack = None
    session = requests.Session()
    try:
        if args.spawn:
            stack = spawn(args, args.images)
            backend, redis_url, base = stack.backend_url, stack.redis_url, "/data/upload/"
        else:
            backend, redis_url, base = args.backend.rstrip("/"), args.redis_url, args.image_base
        health = wait_for_fleet(session, backend, args.workers if args.spawn else 1, 300)
        tasks = build_tasks(args.images, base, args.max_images)
        # warm-up (CUDA kernels, lazy init) on images the measured run does not use first
        warm = [{"task": dict(t["task"], id=10_000 + i), "width": t["width"], "height": t["height"]}
                for i, t in enumerate(tasks[-max(1, args.warmup_clicks):])]
        for t in warm * max(1, (args.workers if args.spawn else 1)):
            body = {"tasks": [t["task"]], "label_config": SMART_CONFIG, "params": {"context": {"result": [
                {"from_name": "point", "to_name": "image", "type": "keypointlabels", "original_width": t["width"],
                 "original_height": t["height"], "is_positive": True,
                 "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}]}}}
            session.post(f"{backend}/predict", json=body, timeout=120)
        time.sleep(1.0)
        before = fleet_counters(redis_url)
        cpu_before = stack.cpu_seconds() if stack else {}
        own_before = os.times()
        started = time.monotonic()
        stop_at = started + args.duration
        results = play(args, backend, tasks[:-len(warm)] or tasks, stop_at)
        elapsed = time.monotonic() - started
        own = os.times()  # this process (and its stand-in file server), and the load processes (reaped children)
        cpu = {name: used - cpu_before.get(name, 0.0) for name, used in (stack.cpu_seconds() if stack else {}).items()}
        cpu["load generator"] = sum(getattr(own, f) - getattr(own_before, f)
                                    for f in ("user", "system", "children_user", "children_system"))
        time.sleep(1.0)  # workers publish their counters with each heartbeat (every alive_ttl/3)
        after = fleet_counters(redis_url)
        health = session.get(f"{backend}/health", timeout=5).json()
    finally:
        if stack is not None:
            stack.stop()

    ok = [c for c in results if c.ok]
    clicks = sum(after.get(w, {}).get("clicks", 0) - before.get(w, {}).get("clicks", 0) for w in after)
    hits = sum(after.get(w, {}).get("click_hits", 0) - before.get(w, {}).get("click_hits", 0) for w in after)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "spawn" if args.spawn else "backend",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("basic_pass",)},
        "environment": environment_info(args),
        "model_version": health.get("model_version"),
        "clicks": len(results),
        "errors": len(results) - len(ok),
        # "HTTP 503" (refused: busy, no worker), "HTTP 504" (no answer within the deadline), ...
        "errors_by_kind": dict(sorted(Counter(c.error.split(":")[0] for c in results if not c.ok).items())),
        "error_samples": sorted({c.error for c in results if not c.ok})[:5],
        "seconds": round(elapsed, 2),
        "throughput_clicks_per_s": round(len(ok) / elapsed, 2) if elapsed else 0,
        "latency_ms": {"all": percentiles([c.ms for c in ok]),
                       "first_click_on_task": percentiles([c.ms for c in ok if c.first]),
                       "follow_up_clicks": percentiles([c.ms for c in ok if not c.first])},
        "embedding_hit_rate": round(hits / clicks, 4) if clicks else None,
        "rle_bytes_median": statistics.median(c.rle_bytes for c in ok) if ok else None,
        "fleet_clicks": clicks,
        # where the host's CPU went while the annotators clicked: seconds per component, and ms per click
        "cpu_seconds": {name: round(used, 2) for name, used in sorted(cpu.items())},
        "cpu_ms_per_click": {name: round(1000 * used / len(ok), 2) for name, used in sorted(cpu.items())} if ok else {},
        "per_worker": {w: {k: after[w].get(k, 0) - before.get(w, {}).get(k, 0) for k in ("jobs", "clicks", "click_hits")}
                       for w in after},
    }
    lat = report["latency_ms"]
    print(f"{report['clicks']} clicks by {args.annotators} annotators in {report['seconds']}s: "
          f"{report['throughput_clicks_per_s']} clicks/s, {report['errors']} errors {report['errors_by_kind']}")
    for name, stats in lat.items():
        if stats.get("n"):
            print(f"  {name:22s} p50 {stats['p50']:8.2f} ms  p90 {stats['p90']:8.2f}  p99 {stats['p99']:8.2f}  (n={stats['n']})")
    print(f"  embedding hit rate (clicks, fleet): {report['embedding_hit_rate']}  per worker: {report['per_worker']}")
    print(f"  brush RLE per mask (median): {report['rle_bytes_median']} bytes")
    print(f"  CPU ms per click ({report['environment']['cpus']} CPUs): {report['cpu_ms_per_click']}")
    if report["error_samples"]:
        print("  errors:", *report["error_samples"], sep="\n    ")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

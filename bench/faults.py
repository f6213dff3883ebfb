"""Fault and fuzz suite: the hardening campaign's scenarios against both serving modes, rerunnable.

Everything runs on 127.0.0.1 and stops by itself: a real redis-server (AOF), two CPU inference workers, the
gunicorn backend (RQ mode, and embedded mode without Redis), a token-protected stand-in for Label Studio's
file server, a "thief" server that records any Authorization header it receives, and a trickling image
server. Each scenario prints a row: tried / failed / lost, where

* failed: requests that got a 5xx where a 4xx or a mask was due, answers slower than their deadline, a
  token sent to the thief, clicks after recovery that still fail, processes that died;
* lost: webhook events that are in neither Redis, the local log nor events.jsonl at the end, whatever the answer
  was: Label Studio does not deliver a webhook again after a failed answer.

    python bench/faults.py                      # every scenario, both modes (about 4 minutes on 2 cores)
    python bench/faults.py --quick              # fewer requests per scenario (CI runs this)
    python bench/faults.py --out bench/results/faults-$(date +%Y%m%d).json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from loadtest import TOKEN, Stack  # noqa: E402
from testbed import FileServer, RedisServer, free_port, wait_port  # noqa: E402
from serving.labels import SMART_CONFIG  # noqa: E402

IMAGES = REPO.parent / "shared" / "data" / "coco_tiny" / "val2017"
DEADLINE_S = 5.0  # the backend's click deadline (SAMLIGHT_DEADLINE_MS default)


@dataclass
class Row:
    mode: str
    scenario: str
    tried: int = 0
    failed: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


class Thief:
    """Records every request, with its headers; ``/trickle`` sends one byte every 0.5 s."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        thief = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                thief.seen.append({"path": self.path, "headers": dict(self.headers)})
                if self.path.startswith("/trickle"):
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(400):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:
                        pass
                    return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tokens_received(self) -> int:
        return sum("Authorization" in r["headers"] for r in self.seen)

    def close(self) -> None:
        self.server.shutdown()


class Deployment:
    """One serving mode: the backend (and, in RQ mode, redis-server and two workers) as real processes."""

    def __init__(self, mode: str, images: Path, thief: Thief, directory: Path) -> None:
        self.mode = mode
        self.stack = Stack(directory)
        self.stack.files = FileServer(images, token=TOKEN)
        self.names = sorted(p.name for p in images.glob("*.jpg"))[:20]
        self.sizes = {}
        self.redis = RedisServer(directory)
        self.redis_url = self.redis.url if mode == "rq" else None
        self.model_dir = directory / "models"
        self.env = dict(os.environ, MODEL_DIR=str(self.model_dir), LABEL_STUDIO_URL=self.stack.files.url,
                        LABEL_STUDIO_API_KEY=TOKEN, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                        SAMLIGHT_TORCH_THREADS="1", LOG_LEVEL="WARNING",
                        # the thief and trickle server is on loopback: allowed, so that the backend really
                        # connects to it (and the test sees whether a token goes along)
                        SAMLIGHT_FETCH_ALLOW="127.0.0.1")
        self.thief = thief
        self.redis_process = None
        self.workers: dict[str, object] = {}
        self.backend_url = ""

    # --- processes --------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis_process = self.stack.start("redis", self.redis.command(), dict(os.environ))
        wait_port(self.redis.port, 15, "redis-server", self.redis_process)

    def stop_redis(self, sig=signal.SIGTERM) -> None:
        self.redis_process.send_signal(sig)
        self.redis_process.wait(timeout=15)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.stack.start(name, [
            sys.executable, "-m", "workers.inference", "--gpu", "-1", "--random", "lightening_test",
            "--redis-url", self.redis_url, "--name", name], dict(self.env, REDIS_URL=self.redis_url))

    def start(self) -> "Deployment":
        env = dict(self.env)
        if self.mode == "rq":
            self.start_redis()
            env["REDIS_URL"] = self.redis_url
            for name in ("fw1", "fw2"):
                self.start_worker(name)
        else:
            env["SAMLIGHT_RANDOM"] = "lightening_test"
        port = free_port()
        self.stack.start("backend", [sys.executable, "-m", "backend.serve", "--port", str(port), "--host",
                                     "127.0.0.1"], env)
        self.backend_url = f"http://127.0.0.1:{port}"
        wait_port(port, 120, "backend", self.stack.processes[-1][1])
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # workers loaded (RQ) / model loaded (embedded)
            try:
                health = requests.get(f"{self.backend_url}/health", timeout=2).json()
                if (len(health.get("workers", [])) == 2) if self.mode == "rq" else health.get("model_loaded"):
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.mode}: the stack did not come up")

    def stop(self) -> None:
        self.stack.stop()

    # --- requests ------------------------------------------------------------------------------------

    def click(self, index: int, url: str | None = None, points: int = 1, timeout: float = 30) -> tuple[int, float]:
        """One smart-keypoint click; (HTTP status, seconds). Status 0: no answer (connection failed)."""
        image = url or f"/data/upload/{self.names[index % len(self.names)]}"
        keypoint = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels",
                    "original_width": 640, "original_height": 480, "is_positive": True,
                    "value": {"x": 30 + index % 40, "y": 50, "keypointlabels": ["Object"]}}
        body = {"tasks": [{"id": index, "data": {"image": image}}], "project": "1.1", "label_config": SMART_CONFIG,
                "params": {"context": {"result": [keypoint] * points}}}
        started = time.monotonic()
        try:
            status = requests.post(f"{self.backend_url}/predict", json=body, timeout=timeout).status_code
        except requests.RequestException:
            status = 0
        return status, time.monotonic() - started

    def webhook(self, annotation_id: int) -> int:
        event = {"action": "ANNOTATION_CREATED", "project": {"id": 1},
                 "task": {"id": annotation_id, "data": {"image": f"/data/upload/{self.names[0]}"}},
                 "annotation": {"id": annotation_id, "task": annotation_id, "updated_at": "2026-12-02T00:00:00Z",
                                "result": []}}
        try:
            return requests.post(f"{self.backend_url}/webhook", json=event, timeout=30).status_code
        except requests.RequestException:
            return 0

    def stored_annotations(self) -> set[str]:
        """Annotation ids that are durable now: Redis's corrections hash, the local logs, events.jsonl."""
        ids: set[str] = set()
        corrections = self.model_dir / "corrections"
        for name in ("redis-pending.jsonl", "events.jsonl"):
            path = corrections / name
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    event = event.get("event", event)
                    if isinstance(event.get("annotation"), dict):
                        ids.add(str(event["annotation"]["id"]))
        if self.redis_url:
            try:
                client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
                ids |= {k.decode() for k in client.hkeys("samlight:corrections")}
            except redis.RedisError:
                pass
        return ids

    def processes_alive(self) -> bool:
        return all(process.poll() is None for name, process in self.stack.processes if name != "redis")


# --- scenarios -----------------------------------------------------------------------------------------

def under_load(deployment: Deployment, row: Row, fault, clicks: int, first_id: int) -> None:
    """Clicks from 3 threads and a steady stream of webhooks (one every 50 ms) while ``fault()`` runs; then
    clicks until the stack recovers."""
    sent: list[int] = []
    webhook_errors: list[int] = []
    slow: list[float] = []
    fault_over = threading.Event()

    def annotator(k: int):
        for n in range(clicks):
            status, seconds = deployment.click(k * 100 + n)
            if seconds > DEADLINE_S + 2:  # a click must be answered, one way or the other, near its deadline
                slow.append(seconds)
            row.tried += 1

    def corrections():
        annotation = first_id
        while not fault_over.is_set() or len(sent) < 20:
            status = deployment.webhook(annotation)
            sent.append(annotation)
            if status >= 500 or status == 0:
                webhook_errors.append(status)
            annotation += 1
            row.tried += 1
            time.sleep(0.05)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(annotator, k) for k in range(3)] + [pool.submit(corrections)]
        time.sleep(1.0)
        fault()
        time.sleep(1.0)
        fault_over.set()
        for future in futures:
            future.result()
    # recovery: clicks must succeed again within 15 s
    recovered_in = None
    started = time.monotonic()
    while time.monotonic() - started < 15:
        if deployment.click(7)[0] == 200:
            recovered_in = time.monotonic() - started
            break
        time.sleep(0.2)
    if recovered_in is None:
        row.failed += 1
        row.notes.append("clicks did not work again within 15 s")
    else:
        row.notes.append(f"clicks ok again after {recovered_in:.1f}s")
    time.sleep(3)  # the local log is replayed in the background
    if webhook_errors:
        row.notes.append(f"{len(webhook_errors)} webhook(s) answered {sorted(set(webhook_errors))}")
    missing = set(map(str, sent)) - deployment.stored_annotations()
    row.lost += len(missing)
    row.failed += len(slow)
    if slow:
        row.notes.append(f"{len(slow)} answers past the deadline (max {max(slow):.1f}s)")
    if not deployment.processes_alive():
        row.failed += 1
        row.notes.append("a process died")


def scenario_token_leak(d: Deployment, row: Row, quick: bool) -> None:
    ls = d.stack.files.url.replace("http://", "")
    thief = d.thief.url.replace("http://", "")
    urls = [f"http://{thief}\\@{ls}/data/upload/{d.names[0]}", f"http://{thief}\\\\@{ls}/data/upload/{d.names[0]}",
            f"http://{ls}@{thief}/data/upload/x.jpg", f"http://u:p@{ls}/data/upload/{d.names[0]}",
            f"{d.thief.url}/x\\@{ls}/data/upload/{d.names[0]}", f"//{thief}/data/upload/x.jpg",
            f"{d.thief.url}/data/upload/x.jpg"]
    before = d.thief.tokens_received()
    for index, url in enumerate(urls):
        status, _ = d.click(900 + index, url=url)
        row.tried += 1
        if status >= 500 and status != 502:  # 502: refused target (private address), answered cleanly
            row.failed += 1
    leaked = d.thief.tokens_received() - before
    row.failed += leaked
    row.notes.append(f"{len(d.thief.seen)} request(s) reached the other host, {leaked} with the token")


def scenario_fuzz(d: Deployment, row: Row, quick: bool) -> None:
    point = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels", "original_width": 640,
             "original_height": 480, "value": {"x": 5, "y": 5, "keypointlabels": ["Object"]}}
    task = [{"id": 1, "data": {"image": f"/data/upload/{d.names[0]}"}}]

    def predict(result):
        return {"tasks": task, "label_config": SMART_CONFIG, "params": {"context": {"result": result}}}

    bodies = [
        ("/predict", '{"tasks": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        ("/predict", predict([{**point, "from_name": ["point"]}])),
        ("/predict", predict([{**point, "from_name": {"a": 1}}])),
        ("/predict", predict([{**point, "value": {"x": 10 ** 400, "y": 1}}])),
        ("/predict", predict([point] * (500 if quick else 8000))),
        ("/predict", predict([point] * 100_000)),
        ("/predict", {"tasks": [{"id": 1, "data": "x"}], "label_config": SMART_CONFIG}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"result": []}}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "task": {"data": "img.jpg"}}),
        ("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": "all"}),
        ("/setup", {"schema": SMART_CONFIG, "extra_params": "{nope"}),
    ]
    for path, body in bodies:
        data = body if isinstance(body, str) else json.dumps(body)
        try:
            status = requests.post(f"{d.backend_url}{path}", data=data, timeout=30,
                                   headers={"Content-Type": "application/json"}).status_code
        except requests.RequestException:
            status = 0
        row.tried += 1
        if not 400 <= status < 500:
            row.failed += 1
            row.notes.append(f"{path}: {status}")
    # basic auth with non-ASCII credentials (the backend has none configured: must still be 200/4xx, never 500)
    status = requests.get(f"{d.backend_url}/health", headers={"Authorization": "Basic w6TDtjrDvA=="}).status_code
    row.tried += 1
    row.failed += status >= 500 and status != 503


def scenario_trickle(d: Deployment, row: Row, quick: bool) -> None:
    """Clicks on a trickling image while other annotators click normal ones: only the former may fail."""
    slow_url = f"{d.thief.url}/trickle"
    with ThreadPoolExecutor(8) as pool:
        trickles = [pool.submit(d.click, 500 + k, slow_url) for k in range(6)]
        time.sleep(0.5)
        normal = [pool.submit(d.click, k) for k in range(10 if quick else 40)]
        results = [f.result() for f in normal]
        [f.result() for f in trickles]
    row.tried += len(results) + 6
    row.failed += sum(status != 200 for status, _ in results)
    worst = max(seconds for _, seconds in results)
    row.notes.append(f"normal clicks: worst {worst:.1f}s")


def scenario_bulk_prewarm(d: Deployment, row: Row, quick: bool) -> None:
    """Retrieve Predictions over hundreds of tasks, then clicks at once: clicks go before the bulk work."""
    tasks = [{"id": 10_000 + k, "data": {"image": f"/data/upload/{d.names[k % len(d.names)]}?batch={k}"}}
             for k in range(200 if quick else 2000)]
    body = {"tasks": tasks, "project": "1.1", "label_config": SMART_CONFIG, "params": {"context": None}}
    status = requests.post(f"{d.backend_url}/predict", json=body, timeout=60).status_code
    row.tried += 1
    row.failed += status != 200
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(d.click, range(12 if quick else 40)))
    row.tried += len(results)
    row.failed += sum(status != 200 for status, _ in results)
    row.notes.append(f"clicks during the batch: worst {max(s for _, s in results):.1f}s")


def scenario_redis(kind: str):
    def run(d: Deployment, row: Row, quick: bool) -> None:
        if d.mode != "rq":
            row.notes.append("RQ mode only")
            return
        admin = redis.Redis.from_url(d.redis_url)

        def fault():
            if kind == "restart":
                d.stop_redis()
                d.start_redis()
            elif kind == "stop":
                d.stop_redis()
                time.sleep(5)
                d.start_redis()
            elif kind == "freeze":
                d.redis_process.send_signal(signal.SIGSTOP)
                time.sleep(3)
                d.redis_process.send_signal(signal.SIGCONT)
            elif kind == "oom":
                admin.config_set("maxmemory-policy", "noeviction")
                admin.set("faults:ballast", "x" * 3_000_000)
                admin.config_set("maxmemory", "1mb")
                time.sleep(3)
                admin.config_set("maxmemory", "0")
                admin.delete("faults:ballast")

        under_load(d, row, fault, clicks=6 if quick else 25, first_id=hash(kind) % 10_000 * 1000)
    return run


def scenario_kill_worker(d: Deployment, row: Row, quick: bool) -> None:
    if d.mode != "rq":
        row.notes.append("RQ mode only")
        return

    def fault():
        d.workers["fw1"].send_signal(signal.SIGKILL)
        d.workers["fw1"].wait()
        d.stack.processes = [(n, p) for n, p in d.stack.processes if p is not d.workers["fw1"]]
        d.start_worker("fw1")  # the same name, at once

    under_load(d, row, fault, clicks=6 if quick else 25, first_id=5_000_000)


SCENARIOS = {
    "token leak URLs": scenario_token_leak,
    "fuzz bodies and limits": scenario_fuzz,
    "trickling image server": scenario_trickle,
    "batch of many tasks": scenario_bulk_prewarm,
    "Redis restart": scenario_redis("restart"),
    "Redis stopped 5 s": scenario_redis("stop"),
    "Redis frozen 3 s": scenario_redis("freeze"),
    "Redis out of memory 3 s": scenario_redis("oom"),
    "worker kill -9 + restart": scenario_kill_worker,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per scenario")
    parser.add_argument("--modes", nargs="+", default=["rq", "embedded"], choices=["rq", "embedded"])
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    import tempfile

    rows: list[Row] = []
    thief = Thief()
    try:
        for mode in args.modes:
            deployment = Deployment(mode, args.images, thief, Path(tempfile.mkdtemp(prefix=f"samlight-faults-{mode}-")))
            try:
                deployment.start()
                for name, scenario in SCENARIOS.items():
                    row = Row(mode, name)
                    started = time.monotonic()
                    scenario(deployment, row, args.quick)
                    row.notes.append(f"{time.monotonic() - started:.0f}s")
                    rows.append(row)
                    print(f"{mode:9s} {name:26s} tried {row.tried:5d}  failed {row.failed:3d}  lost {row.lost:3d}  "
                          f"{'; '.join(row.notes)}", flush=True)
            finally:
                deployment.stop()
    finally:
        thief.close()
    failed, lost = sum(r.failed for r in rows), sum(r.lost for r in rows)
    print(f"\n{'mode':9s} {'scenario':26s} {'tried':>6s} {'failed':>6s} {'lost':>5s}")
    for r in rows:
        print(f"{r.mode:9s} {r.scenario:26s} {r.tried:6d} {r.failed:6d} {r.lost:5d}")
    print(f"{'total':36s} {sum(r.tried for r in rows):6d} {failed:6d} {lost:5d}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "quick": args.quick, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0 if failed == 0 and lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

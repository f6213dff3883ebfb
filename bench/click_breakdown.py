"""Where a cached click's time goes in RQ mode: worker compute, the Redis round trip, the backend's HTTP layer.

Starts redis-server and one inference worker (``--gpu``), then times the same cached click three ways:

1. ``worker``: the worker's own prompt -> brush RLE time (the job result's ``timings_ms["mask"]``: decoder,
   upsampling, RLE on the device, the bytes copied to the host);
2. ``rq``: ``RQSegmenter.segment`` from this process: enqueue, worker pick-up, compute, result back;
3. ``flask``: ``POST /predict`` through the backend app in process (Label Studio's JSON in and out, no socket).

The load test adds the socket and gunicorn on top of 3. Prints a table and writes JSON (``--out``).

    python bench/click_breakdown.py --redis-server .redis-bin/redis-server --images .loadtest-images \\
        --gpu 0 [--random lightening_t | --checkpoint DIR] --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from testbed import FileServer, RedisServer  # noqa: E402


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def click_body(url: str, x: float, config: str) -> dict:
    point = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels", "original_width": 640,
             "original_height": 480, "image_rotation": 0, "is_positive": True,
             "value": {"x": x, "y": 40.0, "width": 0.6, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": config,
            "params": {"context": {"result": [point]}}}


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-server", required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gpu", default="-1", help="worker device: GPU index, -1 for the CPU")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--random", default="lightening_t")
    model.add_argument("--checkpoint")
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="samlight-breakdown-"))
    # the image server runs on loopback, which the fetcher refuses unless allowed
    env = dict(os.environ, LOG_LEVEL="WARNING", MODEL_DIR=str(scratch / "models"), SAMLIGHT_FETCH_ALLOW="127.0.0.1")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(Path(args.redis_server).resolve().parent),
                                                           env.get("LD_LIBRARY_PATH")]))
    redis = RedisServer(scratch, binary=args.redis_server, appendfsync=None).start(env)
    redis_url = redis.url
    images = FileServer(args.images)
    processes = []
    try:
        model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--random", args.random]
        processes.append(subprocess.Popen([sys.executable, "-m", "workers.inference", "--gpu", args.gpu, *model,
                                           "--redis-url", redis_url, "--name", "w0"], env=env, cwd=REPO))
        from backend.app import create_app
        from serving.jobs import SegmentJob
        from backend.labels import SMART_CONFIG
        from serving.config import Settings
        from serving.images import ImageFetcher
        from serving.remote import RQSegmenter

        settings = Settings.from_env(env)
        settings.rq.redis_url = redis_url
        segmenter = RQSegmenter(settings.rq, ImageFetcher.from_settings(settings.fetch))
        wait_for(lambda: segmenter.alive_workers(), 180, "the inference worker")
        name = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
        url = images.file_url(name)
        key = segmenter.fetcher.image_key(url)

        def job(i: int) -> SegmentJob:
            return SegmentJob(image_url=url, image_key=key, points=[[20.0 + 7 * i % 600, 200.0]], point_labels=[1])

        for i in range(5):  # the first click embeds the image; the rest warm the decoder's graph
            segmenter.segment([job(i)])
        rq_ms, mask_ms, rle_bytes = [], [], []
        for i in range(args.clicks):
            started = time.perf_counter()
            result = segmenter.segment([job(i)])[0]
            rq_ms.append((time.perf_counter() - started) * 1000)
            mask_ms.append(result["timings_ms"]["mask"])
        client = create_app(segmenter=segmenter).test_client()
        flask_ms = []
        for i in range(args.clicks):
            started = time.perf_counter()
            response = client.post("/predict", json=click_body(url, 3 + 94 * i / args.clicks, SMART_CONFIG))
            body = response.get_json()
            flask_ms.append((time.perf_counter() - started) * 1000)
            rle_bytes.append(len(body["results"][0]["result"][0]["value"]["rle"]))
    finally:
        images.close()
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
        redis.stop()

    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": vars(args),
              "p50_ms": {"worker_mask": p50(mask_ms), "rq_round_trip": p50(rq_ms),
                         "flask_predict": p50(flask_ms)},
              "rle_bytes_median": statistics.median(rle_bytes)}
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if args.gpu != "-1" else "cpu"
    except Exception:  # noqa: BLE001
        report["device"] = "unknown"
    p = report["p50_ms"]
    print(f"{'stage (cached click, p50)':34s} ms")
    print(f"{'worker: prompt -> brush RLE':34s} {p['worker_mask']:8.2f}")
    print(f"{'RQ round trip (incl. the above)':34s} {p['rq_round_trip']:8.2f}")
    print(f"{'backend /predict in process':34s} {p['flask_predict']:8.2f}")
    print(f"median brush RLE: {report['rle_bytes_median']} bytes; device {report['device']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

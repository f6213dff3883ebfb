"""Click -> brush mask latency through the whole backend (HTTP, fetch, embedding, decoder, RLE).

Starts ``samlight-serve`` (gunicorn) on a free port unless ``--url`` points at a running backend, serves COCO
images from a local HTTP server, and times ``POST /predict`` with a one-keypoint context:
uncached (a new image per click: fetch + encoder + decoder) and cached (the same image again: decoder only).

    .venv/bin/python bench/backend_click_latency.py --random lightening_t --images 8 --clicks 20
    .venv/bin/python bench/backend_click_latency.py --url http://127.0.0.1:9090 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from serving.labels import SMART_CONFIG  # noqa: E402
from testbed import FileServer, free_port  # noqa: E402


def click_body(url: str, width: int, height: int, x: float, y: float) -> dict:
    region = {"type": "keypointlabels", "from_name": "point", "to_name": "image", "original_width": width,
              "original_height": height, "is_positive": True,
              "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": SMART_CONFIG,
            "params": {"context": {"result": [region]}}}


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(values), "p50_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": statistics.fmean(ordered), "min_ms": ordered[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running backend; default: start one")
    parser.add_argument("--random", default="lightening_t", help="random config for the started backend")
    parser.add_argument("--checkpoint", help="checkpoint for the started backend")
    parser.add_argument("--images", type=int, default=8, help="uncached clicks (one per image)")
    parser.add_argument("--clicks", type=int, default=20, help="cached clicks")
    parser.add_argument("--coco", default=os.environ.get("SAMLIGHT_COCO_TINY", REPO.parent / "shared/data/coco_tiny"))
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    from PIL import Image

    images = sorted((Path(args.coco) / "val2017").glob("*.jpg"))[: args.images + 1]
    server = FileServer(images[0].parent)

    process = None
    url = args.url
    if url is None:
        port = free_port()
        model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--random", args.random]
        env = {**os.environ, "SAMLIGHT_HOST": "127.0.0.1", "PORT": str(port), "MODEL_DIR": "/tmp/samlight-bench",
               "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING")}
        process = subprocess.Popen([sys.executable, "-m", "backend.serve", *model, "--workers", "1"], cwd=REPO,
                                   env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health = requests.get(f"{url}/health", timeout=2).json()
                if health.get("model_loaded", True):
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the backend did not start")
            time.sleep(0.5)
        session = requests.Session()

        def click(path: Path, x: float, y: float) -> float:
            width, height = Image.open(path).size
            start = time.perf_counter()
            response = session.post(f"{url}/predict", json=click_body(server.file_url(path.name), width, height, x, y),
                                    timeout=300)
            elapsed = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            return elapsed

        click(images[-1], 50, 50)  # warm-up (first-call allocations), not counted
        uncached = [click(path, 50, 50) for path in images[: args.images]]
        cached = [click(images[0], 20 + (i * 7) % 60, 30 + (i * 11) % 40) for i in range(args.clicks)]
        result = {"backend": url, "model": health.get("model_version"), "device": health.get("device"),
                  "uncached": summary(uncached), "cached": summary(cached)}
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

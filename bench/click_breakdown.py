"""Where a cached click's time goes in RQ mode, for each output type: worker compute, the Redis round trip,
the backend's HTTP layer.

Starts redis-server and one inference worker (``--gpu``), then, for each output (brush without clean-up, the
brush with the default clean-up, polygons, the tight box, all three), times the same cached clicks:

1. ``decoder``: the worker's prompt -> chosen mask at the image size (``timings_ms["mask"]``);
2. ``outputs``: the mask -> what the project asked for (``timings_ms["outputs"]``: clean-up and contours on
   the host, brush RLE where the model runs);
3. ``rq``: ``RQSegmenter.segment`` from this process: enqueue, worker pick-up, compute, result back;
4. ``flask``: ``POST /predict`` through the backend app in process (Label Studio's JSON in and out, no socket).

Random weights give noise masks (thousands of specks): the worst case for clean-up and contours. So the
outputs are also timed on COCO's ground-truth masks (``--coco``), the shapes real masks have: the outputs step
of a click (the mask on the model's device) for each output type, and the host steps alone. The load test
adds the socket and gunicorn on top of 4. Prints a table and writes JSON (``--out``).

``--in-process`` times 1 and 2 only, with the model in this process (the embedded backend's path, and what a
worker does inside its job; no Redis, no HTTP), plus a refining click (the previous logits as ``mask_input``)
and three rectangles in one job.

    python bench/click_breakdown.py --redis-server .redis-bin/redis-server --images .loadtest-images \\
        --gpu 0 [--random lightening_t | --checkpoint DIR] --out OUT.json
    python bench/click_breakdown.py --in-process --images DIR --gpu 0 --out OUT.json
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


def click_body(url: str, x: float, config: str, options: dict) -> dict:
    point = {"id": f"p{x}", "from_name": "point", "to_name": "image", "type": "keypointlabels",
             "original_width": 640, "original_height": 480, "image_rotation": 0, "is_positive": True,
             "value": {"x": x, "y": 40.0, "width": 0.6, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": config, "extra_params": options,
            "params": {"context": {"result": [point]}}}


def labeling_config() -> str:
    from serving.labels import SMART_CONFIG

    return SMART_CONFIG.replace("</View>", """  <PolygonLabels name="outline" toName="image"><Label value="Object"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Object"/></RectangleLabels>
</View>""")


def variants() -> dict[str, tuple[dict, dict]]:
    """name -> (the job's OutputSpec fields, the project options that ask for the same)"""
    from serving.options import ProjectOptions

    area = ProjectOptions.min_area
    return {"brush, no clean-up": ({"min_area": 0}, {"outputs": ["brush"], "min_area": 0}),
            "brush + clean-up": ({"min_area": area}, {"outputs": ["brush"]}),
            "polygon + clean-up": ({"brush": False, "polygon": True, "min_area": area}, {"outputs": ["polygon"]}),
            "box + clean-up": ({"brush": False, "box": True, "min_area": area}, {"outputs": ["box"]}),
            "all three + clean-up": ({"polygon": True, "box": True, "min_area": area}, {})}


def coco_outputs(coco: Path, device: str, limit: int = 200) -> dict[str, float]:
    """p50 ms of the outputs step on real object masks (COCO val ground truth, at the photos' size): each output
    type as a click runs it (the mask on the model's device, copied to the host for clean-up and contours,
    the brush encoded on the device), and the host steps alone."""
    import torch
    from pycocotools.coco import COCO

    from serving import outputs
    from serving.jobs import OutputSpec, _outputs
    from serving.options import ProjectOptions

    api = COCO(str(coco / "annotations" / "instances_val2017.json"))
    masks = [api.annToMask(a).astype(bool) for a in api.loadAnns(api.getAnnIds(iscrowd=False))[:limit]]
    defaults = ProjectOptions()
    steps = {"host: clean-up": lambda m: outputs.clean(m, defaults.min_area, False),
             "host: polygons": lambda m: outputs.polygons(m, defaults.polygon_tolerance, defaults.min_area, False),
             "host: tight box": outputs.tight_box}
    on_device = [torch.from_numpy(m).to(device) for m in masks]
    for name, (output, _) in variants().items():
        steps[f"click: {name}"] = lambda m, o=OutputSpec(**output): _outputs(m, o)
    result = {}
    for name, step in steps.items():
        inputs = on_device if name.startswith("click") else masks
        for mask in inputs[:5]:
            step(mask)  # warm-up
        times = []
        for mask in inputs:
            if device != "cpu":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step(mask)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
        result[name] = p50(times)
    result["masks"] = len(masks)
    return result


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-server", help="path of redis-server (not with --in-process)")
    parser.add_argument("--in-process", action="store_true", help="the model in this process: no Redis, no HTTP")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--gpu", default="-1", help="worker device: GPU index, -1 for the CPU")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--random", default="lightening_t")
    model.add_argument("--checkpoint")
    parser.add_argument("--clicks", type=int, default=50)
    parser.add_argument("--coco", type=Path, default=Path(os.environ.get("SAMLIGHT_COCO_TINY", REPO.parent / "shared/data/coco_tiny")))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = in_process(args) if args.in_process else over_rq(args)
    device = "cpu" if args.gpu == "-1" else f"cuda:{args.gpu}"
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": vars(args),
              "p50_ms": rows, "coco_outputs_p50_ms": coco_outputs(args.coco, device) if args.coco.is_dir() else None}
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if args.gpu != "-1" else "cpu"
    except Exception:  # noqa: BLE001
        report["device"] = "unknown"
    print(f"cached click, p50 ms, {report['device']} ({args.random or args.checkpoint}: noise masks)")
    columns = [c for c in ("decoder", "outputs", "job", "rq_round_trip", "flask_predict", "answer_bytes")
               if any(c in row for row in rows.values())]
    print(f"{'output':28s}" + "".join(f"{c:>15s}" for c in columns))
    for variant, row in rows.items():
        print(f"{variant:28s}" + "".join(f"{row.get(c, float('nan')):15.2f}" for c in columns))
    if report["coco_outputs_p50_ms"]:
        coco = report["coco_outputs_p50_ms"]
        print(f"outputs step on {coco['masks']} COCO ground-truth masks, p50 ms:")
        for name, value in coco.items():
            if name != "masks":
                print(f"  {name:34s} {value:8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


def in_process(args) -> dict[str, dict]:
    """decoder and outputs per output type, with the model in this process (``serving.jobs.execute``)."""
    import torch

    from samlight.image_io import load_image
    from samlight.models import ModelSpec
    from samlight.predictor import Predictor
    from serving.jobs import ObjectJob, OutputSpec, SegmentJob, execute
    from serving.refinement import MaskMemory

    device = "cpu" if args.gpu == "-1" else f"cuda:{args.gpu}"
    spec = ModelSpec.either(args.checkpoint, None if args.checkpoint else args.random)
    predictor = Predictor(spec.load(), device=device)
    name = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    image = load_image(args.images / name)

    class Local:
        def fetch(self, url):
            return image

    height, width = image.shape[:2]
    predictor.embed(image, key="img")
    memory = MaskMemory()

    def point(i: int, **fields) -> ObjectJob:
        return ObjectJob(points=[[(20.0 + 7 * i) % width, height / 2]], point_labels=[1], **fields)

    def timed(objects, output: dict) -> dict:
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = execute(SegmentJob("u", "img", objects, output=OutputSpec(**output)), predictor, Local(),
                         memory=memory)
        result["timings_ms"]["job"] = (time.perf_counter() - started) * 1000
        return result["timings_ms"]

    cases = {name: (lambda i, o=output: timed([point(i)], o)) for name, (output, _) in variants().items()}
    refine = dict(variants()["brush + clean-up"][0])

    def refined(i: int) -> dict:
        timed([point(i, key=f"first{i}")], refine)
        second = ObjectJob(points=[[(20.0 + 7 * i) % width, height / 2], [(40.0 + 7 * i) % width, height / 3]],
                           point_labels=[1, 0], key=f"second{i}", refine=f"first{i}")
        return timed([second], refine)

    def two_clicks(i: int) -> dict:  # the same second click, decoded afresh (the CUDA-graph path)
        second = ObjectJob(points=[[(20.0 + 7 * i) % width, height / 2], [(40.0 + 7 * i) % width, height / 3]],
                           point_labels=[1, 0])
        return timed([second], refine)

    def rectangles(i: int) -> dict:
        boxes = [[10.0 + i % 5, 10.0, 200.0, 200.0], [300.0, 100.0, 500.0, 300.0], [50.0, 250.0, 250.0, 400.0]]
        return timed([ObjectJob(box=b) for b in boxes], refine)

    cases.update({"2nd click, afresh": two_clicks, "2nd click, refined": refined,
                  "3 rectangles, one job": rectangles})
    rows = {}
    for label, case in cases.items():
        for i in range(5):  # warm-up: graphs captured, allocator settled
            case(i)
        runs = [case(i) for i in range(args.clicks)]
        rows[label] = {key: p50([r[key] for r in runs]) for key in ("mask", "outputs", "job")}
        rows[label]["decoder"] = rows[label].pop("mask")
    return rows


def over_rq(args) -> dict[str, dict]:
    """decoder, outputs, the RQ round trip and the backend's /predict per output type."""
    if not args.redis_server:
        raise SystemExit("--redis-server is required (or --in-process)")
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
        from serving.config import Settings
        from serving.images import ImageFetcher
        from serving.jobs import ObjectJob, OutputSpec, SegmentJob
        from serving.remote import RQSegmenter

        settings = Settings.from_env(env)
        settings.rq.redis_url = redis_url
        segmenter = RQSegmenter(settings.rq, ImageFetcher.from_settings(settings.fetch))
        wait_for(lambda: segmenter.alive_workers(), 180, "the inference worker")
        name = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
        url = images.file_url(name)
        key = segmenter.fetcher.image_key(url)
        client = create_app(segmenter=segmenter).test_client()
        config = labeling_config()

        def job(i: int, output: dict) -> SegmentJob:
            point = ObjectJob(points=[[20.0 + 7 * i % 600, 200.0]], point_labels=[1])
            return SegmentJob(image_url=url, image_key=key, objects=[point], output=OutputSpec(**output))

        for i in range(5):  # the first click embeds the image; the rest warm the decoder's graph
            segmenter.segment([job(i, {})])
        rows = {}
        for variant, (output, options) in variants().items():
            decoder_ms, outputs_ms, rq_ms, flask_ms, payload = [], [], [], [], []
            for i in range(args.clicks):
                started = time.perf_counter()
                result = segmenter.segment([job(i, output)])[0]
                rq_ms.append((time.perf_counter() - started) * 1000)
                decoder_ms.append(result["timings_ms"]["mask"])
                outputs_ms.append(result["timings_ms"]["outputs"])
            for i in range(args.clicks):
                started = time.perf_counter()
                response = client.post("/predict", json=click_body(url, 3 + 94 * i / args.clicks, config, options))
                flask_ms.append((time.perf_counter() - started) * 1000)
                payload.append(len(response.data))
            rows[variant] = {"decoder": p50(decoder_ms), "outputs": p50(outputs_ms), "rq_round_trip": p50(rq_ms),
                             "flask_predict": p50(flask_ms), "answer_bytes": statistics.median(payload)}
    finally:
        images.close()
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
        redis.stop()

    return rows


if __name__ == "__main__":
    sys.exit(main())

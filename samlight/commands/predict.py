"""``samlight predict``: one image, point or box prompts, a mask PNG (and an overlay)."""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from PIL import Image

from samlight.image_io import load_image
from samlight.models import ModelSpec
from samlight.overlay import overlay
from samlight.predictor import Predictor

log = logging.getLogger(__name__)


def _point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--point takes x,y or x,y,label (label 1 or 0), got {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point takes numbers, got {text!r}") from None
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"--point label must be 1 (foreground) or 0 (background), got {label}")
    return x, y, label


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box takes x0,y0,x1,y1 numbers, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box takes four numbers x0,y0,x1,y1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="student checkpoint directory or official SAM .pth")
    model.add_argument("--random", metavar="CONFIG", help="random weights of a named config (e.g. lightening_t)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random weights")
    parser.add_argument("--image", required=True, help="image file (EXIF orientation is applied)")
    parser.add_argument("--point", type=_point, action="append", default=[], help="x,y[,1|0] in pixels; repeatable")
    parser.add_argument("--box", type=_box, help="x0,y0,x1,y1 in pixels")
    parser.add_argument("--single", action="store_true", help="one mask instead of the best of three")
    parser.add_argument("--out", required=True, help="mask PNG to write (0/255)")
    parser.add_argument("--overlay", help="PNG of the image with the mask and prompts drawn on it")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    if not args.point and args.box is None:
        raise ValueError("give at least one --point or a --box")
    image = load_image(args.image)
    spec = ModelSpec.either(args.checkpoint, args.random, args.seed)
    model, version = spec.load(), spec.version
    predictor = Predictor(model, device=args.device)
    points = np.array([p[:2] for p in args.point]) if args.point else None
    labels = np.array([p[2] for p in args.point]) if args.point else None
    box = np.array(args.box) if args.box is not None else None
    started = time.perf_counter()
    predictor.set_image(image)
    embedded = time.perf_counter()
    masks, scores, _ = predictor.predict(points, labels, box, multimask_output=not args.single)
    done = time.perf_counter()
    best = int(np.argmax(scores))
    mask = masks[best]
    Image.fromarray(mask.astype(np.uint8) * 255).save(args.out)
    if args.overlay:
        overlay(image, [mask], points, labels, box).save(args.overlay)
    print(
        f"{args.out}: {int(mask.sum())} of {mask.size} pixels, predicted IoU {scores[best]:.3f}, model {version}; "
        f"embedding {1000 * (embedded - started):.1f} ms, decoder {1000 * (done - embedded):.1f} ms"
    )
    return 0

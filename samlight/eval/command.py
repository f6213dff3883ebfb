"""``samlight eval``: COCO box / point mIoU, and fidelity to a teacher under the same prompts."""

from __future__ import annotations

import argparse
import copy
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="student checkpoint directory, official SAM .pth, or random:vit_b[:seed]")
    model.add_argument("--random", metavar="CONFIG", help="random weights of a named student config")
    model.add_argument("--baseline", choices=["box", "oracle"], help="harness check: filled GT box / GT mask")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random weights")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco", help="COCO instances json[:image dir] (default image dir: the standard layout)")
    data.add_argument("--images", help="image folder without ground truth (fidelity only; needs --teacher)")
    parser.add_argument("--prompt", choices=["box", "point"], default="box")
    parser.add_argument("--clicks", type=int, default=1, help="point prompts: clicks per instance")
    parser.add_argument("--no-chain", dest="chain", action="store_false",
                        help="point prompts: decode every round's clicks afresh, without the previous mask as "
                             "mask_input (the default chains them, as SAM was trained and as the backend serves)")
    parser.add_argument("--curve", help="point prompts: PNG of mIoU (and fidelity) after each click, chained and "
                                        "not (runs the other mode too)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images only")
    parser.add_argument("--teacher", help="also measure fidelity to this teacher (vit_h:/p.pth, random:vit_b, ...)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--grid", help="PNG grid of example predictions")
    parser.add_argument("--examples", type=int, default=6, help="images in the --grid")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                        help="the model's encoder precision (default: bf16 on CUDA, fp32 on CPU; int8: CPU only); "
                             "other than fp32, also measures agreement with the same model in fp32")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from samlight.distill.data import coco_dataset, image_folder, parse_coco_spec
    from samlight.eval.fidelity import fidelity
    from samlight.eval.protocol import evaluate_samples, summarise
    from samlight.eval.report import click_curve, example_grid, table, write_json
    from samlight.models import ModelSpec
    from samlight.predictor import Predictor

    if args.clicks < 1:
        raise ValueError("--clicks must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError("--max-images must be >= 1")
    if args.coco:
        annotations, image_dir = parse_coco_spec(args.coco)
        samples = coco_dataset(annotations, image_dir, max_images=args.max_images)
    else:
        if not args.teacher or args.baseline:
            raise ValueError("--images has no ground truth: give --teacher for fidelity (and a model, not a baseline)")
        samples = image_folder(args.images)[: args.max_images]
    progress = not args.no_progress
    if args.baseline:
        model, version = args.baseline, f"baseline:{args.baseline}"
        if args.teacher:
            raise ValueError("--teacher fidelity needs a model, not a --baseline")
    else:
        spec = ModelSpec.either(args.checkpoint, args.random, args.seed)
        model, version = spec.load(), spec.version
    predictor = reference = None
    if args.precision:
        if args.baseline:
            raise ValueError("--precision applies to a model, not a --baseline")
        if args.precision != "fp32":  # built first: a bf16 predictor converts the model's encoder in place
            reference = Predictor(copy.deepcopy(model), device=args.device, encoder_precision="fp32")
        predictor = Predictor(model, device=args.device, encoder_precision=args.precision)
    teacher_spec = ModelSpec.parse(args.teacher) if args.teacher else None
    teacher = teacher_spec.load() if teacher_spec else None
    if args.coco:
        if predictor is None and not args.baseline:  # one predictor for both modes of --curve
            predictor = Predictor(model, device=args.device)
        teacher_predictor = Predictor(teacher, device=args.device) if teacher is not None else None

        def evaluate(chained: bool, keep: int) -> dict:
            return evaluate_samples(model, samples, args.prompt, args.clicks, args.device, keep_examples=keep,
                                    progress=progress, predictor=predictor, chained=chained,
                                    teacher_predictor=teacher_predictor if args.prompt == "point" else None)

        result = evaluate(args.chain, args.examples if args.grid else 0)
        if args.curve:
            if args.prompt != "point":
                raise ValueError("--curve plots point prompts per click: give --prompt point")
            other = evaluate(not args.chain, 0)
            click_curve({args.chain: result, not args.chain: other}, args.curve, title=f"{version}: clicks")
            result["other_mode"] = {k: other[k] for k in ("chained", "per_click_miou", "per_click_fidelity")
                                    if k in other}
    else:
        result = summarise([], [])
        result.update({"images": len(samples), "prompt": args.prompt, "seconds": 0.0, "examples": []})
    result["model"] = version
    if teacher is not None:
        fid = fidelity(model, teacher, samples, args.device, progress=progress, student_predictor=predictor)
        fid["teacher"] = teacher_spec.identity
        if result.get("per_click_fidelity"):  # fidelity under the prompt evaluated: after the last click
            fid.update(mask_iou=result["per_click_fidelity"][-1], prompts=result["instances"],
                       mask_iou_prompt=f"point, {args.clicks} click(s)")
        else:
            fid["mask_iou_prompt"] = "box"
        result["fidelity"] = fid
    if reference is not None:
        result["precision"] = args.precision
        result["vs_fp32"] = fidelity(model, model, samples, args.device, progress=progress,
                                     student_predictor=predictor, teacher_predictor=reference)
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.grid:
        if not result["examples"]:
            raise ValueError("--grid needs --coco ground truth")
        example_grid(result["examples"], args.grid, title=f"{version}: {args.prompt} prompts")
        print(f"wrote {args.grid}")
    if args.curve:
        print(f"wrote {args.curve}")
    return 0

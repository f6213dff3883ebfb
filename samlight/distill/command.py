"""``samlight distill``: Dynamic Layer-wise Distillation of a student from a SAM teacher.

Every field of :class:`FineTuneConfig` is an option (``--encoder-steps``, ``--cache-dir``, ...).
Rerun the same command after an interruption to resume; ``torchrun --nproc_per_node N`` spreads it
over N processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from samlight.distill.config import FineTuneConfig

HELP = {
    "out_dir": "output directory: student/, metrics.jsonl, plots/, state/ (rerun to resume)",
    "encoder_steps": "optimiser steps of the encoder (feature distillation) stage",
    "decoder_steps": "optimiser steps of the decoder-alignment stage",
    "batch_size": "images per step and process",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "cache_dir": "teacher feature cache directory (fp16, reusable across runs)",
    "cache_max_gb": "bound of the teacher feature cache",
    "layer_sigma": "width of the dynamic layer-weight bump (README: Distillation)",
    "augment": "share of the encoder stage's images seen as a random view (crop, flip, colour)",
    "output_weight": "encoder stage: weight of the masks' loss through the frozen decoder (docs/distillation.md)",
    "output_prompts": "encoder stage: random prompts per image for that loss (half boxes, half clicks)",
    "unfreeze_blocks": "decoder stage: also train this many encoder blocks, from the last back (-1: all)",
    "teacher_loss_weight": "decoder stage: weight of the loss against the teacher's mask logits",
    "gt_loss_weight": "decoder stage: weight of focal + dice against ground-truth masks",
    "checkpoint_every": "steps between atomic training-state checkpoints",
    "num_workers": "data loader threads (0: load in the training loop)",
    "max_images": "use only the first N images",
    "restart": "start over in --out even if it holds an unfinished run with other settings (refused otherwise)",
    "autocast": "bf16 autocast (default: on for CUDA)",
}


def _option_type(field: dataclasses.Field):
    hint = typing.get_type_hints(FineTuneConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="vit_h:/path/sam_vit_h.pth, /path/sam.pth, or random:vit_b[:seed]")
    parser.add_argument("--student", default="lightening_t",
                        help="named student config, or a student checkpoint to fine-tune")
    parser.add_argument("--coco", action="append", default=[], help="COCO instances json[:image dir]; repeatable")
    parser.add_argument("--images", action="append", default=[], help="image folder (no ground truth); repeatable")
    parser.add_argument("--out", dest="out_dir", required=True, help=HELP["out_dir"])
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    for field in dataclasses.fields(FineTuneConfig):
        if field.name in ("out_dir", "progress"):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _option_type(field)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=HELP.get(field.name))
        else:
            parser.add_argument(flag, type=kind, default=field.default,
                                help=HELP.get(field.name, "") + f" (default {field.default})")


def run(args: argparse.Namespace) -> int:
    from samlight.distill.data import coco_dataset, image_folder, parse_coco_spec
    from samlight.distill.trainer import fine_tune

    if not args.coco and not args.images:
        raise ValueError("give training data: --coco ANNOTATIONS.json[:IMAGES] and/or --images DIR")
    samples = []
    for spec in args.coco:
        annotations, images = parse_coco_spec(spec)
        samples.extend(coco_dataset(annotations, images))
    for folder in args.images:
        samples.extend(image_folder(folder))
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FineTuneConfig)}
    config = FineTuneConfig(**values)
    path = fine_tune(args.student, args.teacher, samples, config)
    from samlight.checkpoints import read_student_manifest

    manifest = read_student_manifest(path)
    teacher = manifest["metadata"].get("teacher")
    print(f"student checkpoint: {path} (sha256 {manifest['sha256'][:12]}, teacher {teacher})")
    final = manifest["metadata"].get("metrics", {})
    for stage, record in final.items():
        print(f"{stage} stage, last step: " + json.dumps({k: record[k] for k in sorted(record)
                                                         if isinstance(record[k], (int, float))}))
    return 0

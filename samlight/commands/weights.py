"""``samlight weights``: inspect and verify checkpoints, or start a student from a teacher."""

from __future__ import annotations

import argparse
import json

from samlight.checkpoints import load_student, read_student_manifest, save_student, sha256_file
from samlight.models import ModelSpec
from samlight.modeling import STUDENT_CONFIGS, build_student, seeded, student_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="config, hash and metadata of a student checkpoint")
    info.add_argument("path")
    verify = sub.add_parser("verify", help="check a student's sha256 and that it loads, or load an official SAM file")
    verify.add_argument("path")
    init = sub.add_parser("init", help="a new student whose prompt encoder and mask decoder come from a SAM teacher")
    init.add_argument("--config", default="lightening_t", choices=sorted(STUDENT_CONFIGS))
    init.add_argument("--teacher", required=True, help="vit_h:/path/sam_vit_h.pth, /path/sam.pth or random:vit_b")
    init.add_argument("--seed", type=int, default=0, help="seed of the encoder's random initialisation")
    init.add_argument("--out", required=True, help="student checkpoint directory to write")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        manifest = read_student_manifest(args.path)
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    if args.action == "verify":
        from pathlib import Path

        if Path(args.path).is_dir():
            checkpoint = load_student(args.path)
            print(f"{args.path}: ok, {checkpoint.config.name}, sha256 {checkpoint.sha256}")
        else:
            spec = ModelSpec.parse(args.path)
            model = spec.load()
            print(f"{args.path}: ok, SAM {spec.config or 'inferred'} with "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                  f"sha256 {sha256_file(spec.path)}")
        return 0
    spec = ModelSpec.parse(args.teacher)
    config = student_config(args.config)
    teacher = spec.load()
    student = seeded(args.seed, build_student, config, teacher)
    digest = save_student(student, config, args.out, metadata={"teacher": spec.identity, "origin": "init",
                                                                "encoder_seed": args.seed})
    print(f"{args.out}: new {config.name} student (decoder from {spec.identity}), sha256 {digest}")
    return 0

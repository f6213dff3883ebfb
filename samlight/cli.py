"""``samlight`` command line: one sub-command per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command -> module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "predict": ("samlight.commands.predict", "segment an image from point or box prompts"),
    "bench": ("samlight.bench", "encoder latency, memory and throughput next to SAM and other light SAMs"),
    "distill": ("samlight.distill.command", "Dynamic Layer-wise Distillation of a student from a SAM teacher"),
    "eval": ("samlight.eval.command", "COCO box/point mIoU and student-vs-teacher fidelity"),
    "weights": ("samlight.commands.weights", "inspect, verify or convert checkpoints"),
}


class CliError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def build_parser(load: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samlight", description="SAM-Lightening: fast promptable segmentation")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if load is None or name in load:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # import only the module of the command being run (torch imports are slow)
    chosen = [a for a in argv if a in COMMANDS][:1]
    parser = build_parser(load=chosen)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as error:
        print(f"samlight {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

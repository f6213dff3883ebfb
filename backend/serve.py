"""``samlight-serve``: start the backend under gunicorn (port 9090 by default).

    samlight-serve                               # random lightening_t weights (demo), loudly logged
    samlight-serve --checkpoint models/student   # or SAMLIGHT_CHECKPOINT=...
    samlight-serve --random lightening_s --port 9091 --workers 2 --threads 8
    REDIS_URL=redis://localhost:6379/0 samlight-serve   # inference on RQ workers
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_RANDOM = "lightening_t"
MODEL_VARIABLES = ("REDIS_URL", "SAMLIGHT_CHECKPOINT", "SAMLIGHT_RANDOM", "SAMLIGHT_TEST_MODEL")

log = logging.getLogger("samlight.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="samlight-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="student directory or SAM .pth (default: $SAMLIGHT_CHECKPOINT)")
    model.add_argument("--random", metavar="CONFIG", help="random weights of a named config, for demos")
    parser.add_argument("--seed", type=int, help="seed of the random weights")
    parser.add_argument("--host", help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default 9090 or $PORT)")
    parser.add_argument("--workers", type=int, help="gunicorn processes (default 1)")
    parser.add_argument("--threads", type=int, help="threads per process (default 32)")
    parser.add_argument("--model-dir", help="state directory (default $MODEL_DIR or ./models)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default $LOG_LEVEL or INFO)")
    return parser.parse_args(argv)


def environment(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The environment the gunicorn workers read (``BackendSettings.from_env``)."""
    env = dict(env)
    options = {"SAMLIGHT_HOST": args.host, "PORT": args.port, "SAMLIGHT_WORKERS": args.workers,
               "SAMLIGHT_THREADS": args.threads, "MODEL_DIR": args.model_dir, "LOG_LEVEL": args.log_level,
               "SAMLIGHT_SEED": args.seed}
    env.update({key: str(value) for key, value in options.items() if value is not None})
    if args.checkpoint:
        env["SAMLIGHT_CHECKPOINT"] = args.checkpoint
        env.pop("SAMLIGHT_RANDOM", None)
    elif args.random:
        env["SAMLIGHT_RANDOM"] = args.random
        env.pop("SAMLIGHT_CHECKPOINT", None)
    elif not any(env.get(name) for name in MODEL_VARIABLES):
        env["SAMLIGHT_RANDOM"] = DEFAULT_RANDOM
        log.warning("no --checkpoint or SAMLIGHT_CHECKPOINT: serving RANDOM %s WEIGHTS - the masks are "
                    "meaningless (a demo of the plumbing). Pass --checkpoint PATH for real masks.", DEFAULT_RANDOM)
    return env


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    env = environment(args, dict(os.environ))
    from backend.settings import BackendSettings

    try:  # a clear error here rather than gunicorn workers failing to boot
        settings = BackendSettings.from_env(env)
        if not settings.core.redis_url:
            settings.core.model.validate()
    except ValueError as error:
        print(f"samlight-serve: error: {error}", file=sys.stderr)
        return 2
    conf = Path(__file__).with_name("gunicorn_conf.py")
    command = [sys.executable, "-m", "gunicorn", "--config", str(conf), "backend.app:create_app()"]
    log.info("starting: %s", " ".join(command))
    os.execvpe(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""What every worker process does first: read the settings once, apply its command line, set up logging."""

from __future__ import annotations

import argparse
import logging

from serving.config import Settings


def add_redis_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="default: $REDIS_URL or redis://127.0.0.1:6379/0")


def start(args: argparse.Namespace) -> Settings:
    """The process's settings (``--redis-url`` over ``$REDIS_URL``), with logging configured."""
    settings = Settings.from_env()
    if getattr(args, "redis_url", None):
        settings.redis_url = settings.rq.redis_url = args.redis_url
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    return settings

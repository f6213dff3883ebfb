"""``python -m workers.training_worker``: the RQ worker for DLD fine-tuning jobs.

A forking RQ ``Worker`` (each job runs in a fresh work horse, so a crash or OOM in training never takes the
worker down, and GPU memory is returned when the job ends). The parent process never imports torch or
touches CUDA (checked at startup), so forking is safe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rq import Queue, Worker
from rq.serializers import JSONSerializer

from serving.config import WorkerSettings, connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.training_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    settings = WorkerSettings.from_env(redis_url=args.redis_url)
    redis = connect(settings.redis_url, timeout_s=30)
    queue = Queue(settings.keys.training_queue, connection=redis, serializer=JSONSerializer)
    worker = Worker([queue], connection=redis, serializer=JSONSerializer, name=args.name)
    if "torch" in sys.modules:  # forking after CUDA init is unsafe: the parent must stay torch-free
        raise RuntimeError("the training worker's parent imported torch; refusing to fork work horses")
    worker.work(burst=args.burst, logging_level=os.environ.get("LOG_LEVEL", "INFO"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

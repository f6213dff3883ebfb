"""``python -m workers.training_worker``: the RQ worker for DLD fine-tuning jobs.

A forking RQ ``Worker`` (each job runs in a fresh work horse, so a crash or OOM in training never takes the
worker down, and GPU memory is returned when the job ends). The parent process never imports torch or
touches CUDA (checked at startup), so forking is safe.
"""

from __future__ import annotations

import argparse
import sys

from rq import Queue, Worker
from rq.serializers import JSONSerializer

from serving.config import connect
from workers.process import add_redis_argument, start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.training_worker", description=__doc__.split("\n")[0])
    add_redis_argument(parser)
    parser.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    config = start(args)
    settings = config.rq
    redis = connect(settings.redis_url, timeout_s=30)
    queue = Queue(settings.keys.training_queue, connection=redis, serializer=JSONSerializer)
    worker = Worker([queue], connection=redis, serializer=JSONSerializer, name=args.name)
    if "torch" in sys.modules:  # forking after CUDA init is unsafe: the parent must stay torch-free
        raise RuntimeError("the training worker's parent imported torch; refusing to fork work horses")
    worker.work(burst=args.burst, logging_level=config.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

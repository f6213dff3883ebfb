"""``python -m workers.inference --gpu 0``: one inference worker process per GPU.

An RQ ``SimpleWorker`` (jobs run in this process: no fork after CUDA init, the model is loaded once in
``bootstrap()``), JSON serializer (never pickle). It listens on its own queue first (clicks routed to it
because it holds their image's embedding) and on the shared queue. Before running a job it drains what
is already queued (up to ``--max-batch``) and computes all of them in one pass: one batched encoder call
for the new images, then the prompts. Each click's answer goes straight onto its reply list (the backend
BLPOPs it) before RQ records the jobs as finished. ``rq info`` lists these workers and queues like any
others.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid

from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from workers.settings import WorkerSettings, connect

log = logging.getLogger("workers.inference")


class InferenceWorker(SimpleWorker):
    """SimpleWorker with a model runtime, micro-batching and hot reload."""

    def __init__(self, *args, settings: WorkerSettings, runtime_factory, **kwargs) -> None:
        super().__init__(*args, serializer=JSONSerializer, **kwargs)
        self.settings = settings
        self.runtime_factory = runtime_factory
        self.runtime = None

    def bootstrap(self, *args, **kwargs):
        from workers.tasks import current_runtime

        self.runtime = self.runtime_factory(self)
        served = self.runtime.load_initial()
        log.info("worker %s serving %s on %s", self.name, served.version, self.runtime.device)
        current_runtime.set(self.runtime)
        self.runtime.start_background(self.settings.keys.worker_queue(self.name))
        super().bootstrap(*args, **kwargs)

    def _queued(self) -> int:
        """Jobs waiting on this worker's queues: one round trip, where draining empty queues takes one each."""
        with self.connection.pipeline(transaction=False) as pipe:
            for q in self._ordered_queues:
                pipe.llen(q.key)
            return sum(pipe.execute())

    def execute_job(self, job, queue):
        batch = [(job, queue)]
        if self.settings.max_batch > 1 and self._queued():  # a lone click skips the draining round trips
            while len(batch) < self.settings.max_batch:
                more = Queue.dequeue_any(self._ordered_queues, None, connection=self.connection,
                                         job_class=self.job_class, serializer=self.serializer)
                if more is None:
                    break
                batch.append(more)
        jobs = [j for j, _ in batch]
        self.runtime.run_batch(jobs)
        self.runtime.publish_replies(jobs)  # answers first, RQ's bookkeeping after
        for j, q in batch:
            super().execute_job(j, q)

    def teardown(self):
        if self.runtime is not None:
            self.runtime.stop()
        super().teardown()


def make_worker(settings: WorkerSettings, device: str, source, name: str | None = None,
                fetcher=None) -> InferenceWorker:
    from workers.runtime import InferenceRuntime

    name = name or f"infer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    redis = connect(settings.redis_url, timeout_s=10.0)
    queues = [Queue(settings.keys.worker_queue(name), connection=redis, serializer=JSONSerializer),
              Queue(settings.keys.shared_queue, connection=redis, serializer=JSONSerializer)]

    def factory(worker):
        return InferenceRuntime(settings, connect(settings.redis_url, timeout_s=10.0), worker.name, device, source,
                                fetcher)

    return InferenceWorker(queues, name=name, connection=redis, settings=settings, runtime_factory=factory,
                           default_result_ttl=60, worker_ttl=60, job_monitoring_interval=5,
                           log_job_description=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.inference", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", type=int, default=None, help="GPU index (one process per GPU); -1 for CPU")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--checkpoint", default=os.environ.get("SAMLIGHT_CHECKPOINT"),
                        help="model when the registry has no active version (student dir or SAM .pth)")
    parser.add_argument("--random", default=None, help="random-weight config instead (demos and tests)")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    if args.gpu is not None and args.gpu >= 0:
        # pin before torch initialises CUDA: this process only ever sees its GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        device = "cuda"
    elif args.gpu is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = "cpu"
    if args.checkpoint is None and args.random is None:
        args.random = os.environ.get("SAMLIGHT_RANDOM") or None
    from workers.runtime import ModelSource

    settings = WorkerSettings.from_env(redis_url=args.redis_url)
    if args.max_batch:
        settings.max_batch = args.max_batch
    source = ModelSource(checkpoint=args.checkpoint, random=args.random)
    worker = make_worker(settings, device, source, name=args.name)
    # RQ logs three lines per job at INFO: on a click path that is noise, so RQ_LOG_LEVEL defaults to WARNING
    worker.work(burst=args.burst, logging_level=os.environ.get("RQ_LOG_LEVEL", "WARNING"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

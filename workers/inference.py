"""``python -m workers.inference --gpu 0``: one inference worker process per GPU.

An RQ ``SimpleWorker`` (jobs run in this process: no fork after CUDA init, the model is loaded once in
``bootstrap()``), JSON serializer (never pickle). It takes clicks before bulk work: its own click queue
(clicks routed to it because it holds their image's embedding), the shared click queue, then its own and the
shared bulk (prewarm) queues. Before running a job it drains what is already queued (up to ``--max-batch``)
and computes them in at most two passes: the clicks on images it has embedded, then the rest (one batched
encoder call for the new images, then their prompts). Each click's answer goes straight onto its reply list
(the backend BLPOPs it); RQ then records the jobs as finished on a thread of its own
(``workers.bookkeeping``) while the worker takes the next batch. ``rq info`` lists these workers and queues
like any others.

Redis restarts, outages and error replies (OOM, READONLY) end RQ's work loop; ``serve`` keeps the loaded
model, waits until Redis answers and starts the loop again under the same name within about a second, so a
deployment without a process supervisor recovers by itself. A name left registered by a process that died
(``kill -9``) is taken over as soon as that process's heartbeat has expired.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import uuid

import time

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker_registration import unregister

from serving.config import WorkerSettings, connect
from serving.images import ImageFetcher
from workers.bookkeeping import Bookkeeping
from workers.process import add_redis_argument, start

log = logging.getLogger("workers.inference")


class InferenceWorker(SimpleWorker):
    """SimpleWorker with a model runtime, micro-batching and hot reload."""

    # RQ waits up to 60 s between reconnection attempts; a click's deadline is 5 s
    max_connection_wait_time = 1.0
    # job functions run on the bookkeeping thread, where an alarm signal cannot reach them
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args, settings: WorkerSettings, runtime_factory, runtime=None, **kwargs) -> None:
        super().__init__(*args, serializer=JSONSerializer, **kwargs)
        self.settings = settings
        self.runtime_factory = runtime_factory
        self.runtime = runtime  # kept across restarts of the work loop: the model stays loaded
        self.restarted = runtime is not None  # a registration under our name is this process's own
        self.stopping = False
        self.bookkeeping: Bookkeeping | None = None

    def bootstrap(self, *args, **kwargs):
        from workers.tasks import current_runtime

        if self.runtime is None:
            self.runtime = self.runtime_factory(self)
            served = self.runtime.load_initial()
            log.info("worker %s serving %s on %s", self.name, served.version, self.runtime.device)
        current_runtime.set(self.runtime)
        super().bootstrap(*args, **kwargs)  # registers with RQ first: our own heartbeat must not block that
        self.runtime.start_background(self.settings.keys.worker_queue(self.name))
        self.bookkeeping = Bookkeeping(super().execute_job, self.name)

    def register_birth(self):
        if (self.connection.exists(self.key) and not self.connection.hexists(self.key, "death")
                and (self.restarted or not self._name_in_use())):
            # left behind by this process's previous work loop, or by a process that died without unregistering
            # (kill -9, Redis failing at exit)
            log.warning("worker name %s is still registered by a dead work loop: taking it over", self.name)
            with self.connection.pipeline() as pipe:
                pipe.delete(self.key)
                unregister(self, pipeline=pipe)
                pipe.execute()
        super().register_birth()

    def _name_in_use(self) -> bool:
        """Whether a live process heartbeats under this name (samlight's heartbeat, every ~0.5 s)."""
        score = self.connection.zscore(self.settings.keys.heartbeats, self.name)
        return score is not None and score > time.time() * 1000 - self.settings.alive_ttl_ms

    def request_stop(self, signum, frame):
        self.stopping = True
        super().request_stop(signum, frame)

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
        for jobs in self.runtime.answer_order([j for j, _ in batch]):
            self.runtime.run_batch(jobs)
            self.runtime.publish_replies(jobs)  # answers first, RQ's bookkeeping after, on its own thread
        self.bookkeeping.submit(batch)

    def teardown(self):
        if self.bookkeeping is not None:
            self.bookkeeping.stop()
        if self.runtime is not None:
            self.runtime.stop()
        super().teardown()


def make_worker(settings: WorkerSettings, device: str, source, fetcher: ImageFetcher, name: str | None = None,
                runtime=None) -> InferenceWorker:
    from serving.engine import InferenceRuntime

    name = name or f"infer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    connection = connect(settings.redis_url, timeout_s=10.0)
    queues = [Queue(queue, connection=connection, serializer=JSONSerializer)
              for queue in settings.keys.inference_queues(name)]

    def factory(worker):
        return InferenceRuntime(settings, connect(settings.redis_url, timeout_s=10.0), worker.name, device, source,
                                fetcher)

    return InferenceWorker(queues, name=name, connection=connection, settings=settings, runtime_factory=factory,
                           runtime=runtime, default_result_ttl=60, worker_ttl=60, job_monitoring_interval=5,
                           log_job_description=False)


def wait_for_redis(redis_url: str, poll_s: float = 0.25) -> None:
    """Return once Redis answers a PING (and takes a write: an OOM or read-only Redis cannot run a worker)."""
    probe = connect(redis_url, timeout_s=0.5)
    since = time.monotonic()
    logged = 0.0
    while True:
        try:
            probe.ping()
            probe.set("samlight:infer:probe", "1", px=1000)
            return
        except redis.RedisError as error:
            if time.monotonic() - logged > 10:
                log.warning("waiting for Redis (%.0f s): %s: %s", time.monotonic() - since,
                            error.__class__.__name__, error)
                logged = time.monotonic()
            time.sleep(poll_s)


def serve(settings: WorkerSettings, device: str, source, fetcher: ImageFetcher, name: str | None = None,
          burst: bool = False) -> None:
    """Run the worker until it is asked to stop, restarting its work loop after Redis failures."""
    name = name or f"infer-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    runtime = None
    while True:
        worker = make_worker(settings, device, source, fetcher, name=name, runtime=runtime)
        try:
            worker.work(burst=burst, logging_level=settings.rq_log_level)
        except redis.RedisError as error:  # bootstrap / registration could not reach Redis
            log.error("worker %s could not start: %s: %s", name, error.__class__.__name__, error)
        runtime = worker.runtime
        if burst or worker.stopping:
            return
        log.error("worker %s: the work loop ended (Redis failed); restarting it when Redis answers", name)
        time.sleep(0.5)  # a Redis that answers PING but fails every write must not spin this loop
        wait_for_redis(settings.redis_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.inference", description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", type=int, default=None, help="GPU index (one process per GPU); -1 for CPU")
    add_redis_argument(parser)
    parser.add_argument("--checkpoint", help="model when the registry has no active version (student dir or SAM "
                                             ".pth); default: $SAMLIGHT_CHECKPOINT")
    parser.add_argument("--random", help="random-weight config instead (demos and tests); default: $SAMLIGHT_RANDOM")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    args = parser.parse_args(argv)
    config = start(args)
    if args.gpu is not None and args.gpu >= 0:
        # pin before torch initialises CUDA: this process only ever sees its GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        device = "cuda"
    elif args.gpu is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = "cpu"
    settings = config.rq
    if args.max_batch:
        settings.max_batch = args.max_batch
    source = config.model
    if args.checkpoint or args.random:
        source = dataclasses.replace(source, checkpoint=args.checkpoint, random=args.random)
    serve(settings, device, source, ImageFetcher.from_settings(config.fetch), name=args.name, burst=args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

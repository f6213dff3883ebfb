"""``python -m workers.cron``: the one process that schedules DLD fine-tuning.

Built on RQ's own ``CronScheduler`` (visible to ``rq cron`` tooling and the scheduler registry). Two
triggers: every ``SAMLIGHT_TRAIN_EVERY_HOURS`` hours, and whenever ``SAMLIGHT_TRAIN_AFTER_CORRECTIONS``
new corrections have arrived (checked every ``--check-seconds``). Both go through ``enqueue_training``
(fixed job id), and a Redis lock makes sure only one cron process is active: a second one waits as a
standby and takes over when the first dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from datetime import datetime, timezone

from rq.cron import CronJob, CronScheduler

from serving.correction_stream import CorrectionStore
from serving.schedule import enqueue_training
from serving.config import WorkerSettings, connect
from workers.process import add_redis_argument, start

log = logging.getLogger("workers.cron")


class TrainingTrigger(CronJob):
    """A cron entry whose 'enqueue' is the idempotent DLD enqueue (not a plain new job per tick)."""

    def __init__(self, settings: WorkerSettings, interval: int, by_count: bool) -> None:
        super().__init__(queue_name=settings.keys.training_queue, func=enqueue_training, interval=interval,
                         name="samlight-dld-by-count" if by_count else "samlight-dld-every")
        self.settings = settings
        self.by_count = by_count

    def enqueue(self, connection):
        if self.by_count:
            threshold = self.settings.train_after_corrections
            new = CorrectionStore(connection, self.settings.keys).new_since_training()
            if new < threshold:
                return None
            return enqueue_training(connection, self.settings, reason=f"{new} new corrections (>= {threshold})")
        return enqueue_training(connection, self.settings, reason=f"every {self.settings.train_every_hours} h")


class SingleCron(CronScheduler):
    """CronScheduler that runs only while it holds the Redis lock ``Keys.cron_lock``."""

    def __init__(self, connection, settings: WorkerSettings, lock_ttl_s: int = 30) -> None:
        super().__init__(connection, name=f"samlight-cron:{socket.gethostname()}:{os.getpid()}")
        self.settings = settings
        self.lock_ttl_s = lock_ttl_s
        self.token = self.name
        self._holding = False

    def acquire(self) -> bool:
        key = self.settings.keys.cron_lock
        if self.connection.set(key, self.token, nx=True, ex=self.lock_ttl_s):
            return True
        # refresh our own lock (compare-and-expire)
        script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
        return bool(self.connection.eval(script, 1, key, self.token, self.lock_ttl_s))

    def release(self) -> None:
        script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
        try:
            self.connection.eval(script, 1, self.settings.keys.cron_lock, self.token)
        except Exception:
            pass

    def enqueue_jobs(self):
        try:
            holding = self.acquire()
        except Exception as error:  # Redis down: try again next tick
            log.warning("cron: Redis unreachable (%s)", error)
            return []
        if holding != self._holding:
            log.info("cron %s: %s", self.name, "active (holds the lock)" if holding else "standby")
            self._holding = holding
        if not holding:
            return []
        return super().enqueue_jobs()

    def calculate_sleep_interval(self) -> float:
        # wake often enough to keep the lock and to take over from a dead active cron
        return min(super().calculate_sleep_interval(), self.lock_ttl_s / 3)

    def start(self):
        try:
            super().start()
        finally:
            self.release()


def last_training_request(redis, settings: WorkerSettings) -> datetime | None:
    try:
        entries = redis.xrevrange(settings.keys.training_requests, count=1)
    except Exception:  # noqa: BLE001 - Redis down at start: the scheduler retries its ticks anyway
        return None
    if not entries:
        return None
    millis = int(entries[0][0].decode().split("-")[0])
    return datetime.fromtimestamp(millis / 1000, timezone.utc)


def build(settings: WorkerSettings, check_seconds: int) -> SingleCron:
    cron = SingleCron(connect(settings.redis_url), settings)
    if settings.train_every_hours > 0:
        every = TrainingTrigger(settings, max(1, int(settings.train_every_hours * 3600)), False)
        # the clock starts at the last training request (any trigger), not at this process's start, so that
        # restarting the cron neither trains at once nor postpones the schedule
        every.set_enqueue_time(last_training_request(cron.connection, settings) or datetime.now(timezone.utc))
        cron._cron_jobs.append(every)
    if settings.train_after_corrections > 0:
        cron._cron_jobs.append(TrainingTrigger(settings, check_seconds, True))
    return cron


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.cron", description=__doc__.split("\n")[0])
    add_redis_argument(parser)
    parser.add_argument("--every-hours", type=float, default=None, help="SAMLIGHT_TRAIN_EVERY_HOURS")
    parser.add_argument("--after-corrections", type=int, default=None, help="SAMLIGHT_TRAIN_AFTER_CORRECTIONS")
    parser.add_argument("--check-seconds", type=int, default=10)
    args = parser.parse_args(argv)
    settings = start(args).rq
    if args.every_hours is not None:
        settings.train_every_hours = args.every_hours
    if args.after_corrections is not None:
        settings.train_after_corrections = args.after_corrections
    if settings.train_every_hours <= 0 and settings.train_after_corrections <= 0:
        parser.error("nothing to schedule: set --every-hours and/or --after-corrections")
    build(settings, args.check_seconds).start()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

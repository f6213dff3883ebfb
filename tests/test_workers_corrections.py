"""Corrections through Redis: dedup, deletions, webhook flood, Redis outage + restart, cron scheduling."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from _workers_support import REPO, stop, worker_env
from serving.correction_stream import CorrectionStore, RedisCorrectionSink
from serving.corrections import EventLog
from serving.config import WorkerSettings, connect


def event(annotation_id: int, updated: int, action: str = "ANNOTATION_UPDATED", task: int | None = None) -> dict:
    return {
        "action": action,
        "project": {"id": 1},
        "task": {"id": task or annotation_id, "data": {"image": f"/data/upload/1/img{annotation_id}.jpg"}},
        "annotation": {"id": annotation_id, "task": task or annotation_id,
                       "updated_at": f"2026-11-24T10:{updated // 60:02d}:{updated % 60:02d}.000000Z",
                       "result": [{"type": "brushlabels", "value": {"format": "rle", "rle": [0, 1, updated],
                                                                   "brushlabels": ["cat"]},
                                   "original_width": 4, "original_height": 4}]},
    }


def make_sink(redis_server, tmp_path, **settings) -> RedisCorrectionSink:
    config = WorkerSettings(redis_url=redis_server.url, model_dir=tmp_path / "models", **settings)
    return RedisCorrectionSink(config)


def test_dedup_update_and_delete(redis_server, tmp_path):
    sink = make_sink(redis_server, tmp_path)
    store = sink.store
    assert sink.record(event(1, 1, "ANNOTATION_CREATED"))["stored"]
    assert not sink.record(event(1, 1, "ANNOTATION_CREATED"))["stored"]  # redelivery merges
    assert sink.record(event(1, 5))["stored"]  # newer update wins
    assert not sink.record(event(1, 3))["stored"]  # an older update arriving late is ignored
    [correction] = store.all()
    assert correction.updated_at.endswith("00:05.000000Z") and correction.result[0]["value"]["rle"][-1] == 5
    assert correction.image == "/data/upload/1/img1.jpg" and correction.task_id == 1
    assert sink.record({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]})["removed"] == 1
    assert store.count() == 0
    assert not sink.record(event(1, 9))["stored"]  # a replayed create cannot resurrect a deleted annotation
    assert store.count() == 0
    with pytest.raises(ValueError):
        sink.record({"action": "ANNOTATION_CREATED", "annotation": {"result": []}})


def test_webhook_flood_none_lost_duplicates_merged(redis_server, tmp_path):
    """1000 events from 8 threads: 400 annotations, each delivered as create + update + a duplicate."""
    sink = make_sink(redis_server, tmp_path)
    events = []
    for i in range(400):
        events.append(event(i, 1, "ANNOTATION_CREATED"))
        if i < 300:
            events.append(event(i, 2))
        if i < 300:
            events.append(event(i, 2))  # duplicate delivery
    assert len(events) == 1000
    chunks = [events[k::8] for k in range(8)]
    errors = []

    def send(chunk):
        try:
            for e in chunk:
                sink.record(e)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=send, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    corrections = {c.annotation_id: c for c in sink.store.all()}
    assert len(corrections) == 400
    for i in range(400):
        assert corrections[str(i)].updated_at.endswith("00:02.000000Z" if i < 300 else "00:01.000000Z")
    # the stream holds every accepted change once: 400 creates + 300 updates (no duplicates, none lost,
    # whatever order the threads delivered them in, because an older event never overwrites a newer one)
    accepted = sink.redis.xlen(sink.settings.keys.correction_stream)
    assert 400 <= accepted <= 700


def test_redis_restart_loses_no_correction(redis_server, tmp_path):
    sink = make_sink(redis_server, tmp_path)
    for i in range(20):
        sink.record(event(i, 1, "ANNOTATION_CREATED"))
    redis_server.stop()
    outcomes = [sink.record(event(i, 1, "ANNOTATION_CREATED")) for i in range(20, 30)]
    outcomes.append(sink.record({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}]}))
    assert all(o["durable"] == "local-log" for o in outcomes)
    assert sink.local.pending() == 11
    redis_server.start()  # same directory: the AOF brings back what was written before the crash
    deadline = time.monotonic() + 15  # the sink's background replayer moves the log into Redis
    while sink.local.pending() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sink.local.pending() == 0
    ids = {c.annotation_id for c in CorrectionStore(connect(redis_server.url)).all()}
    assert ids == {str(i) for i in range(30)} - {"3"}


@pytest.mark.parametrize("failure", ["maxmemory", "readonly"])
def test_redis_error_replies_lose_no_correction(redis_server, tmp_path, failure):
    """Redis answering with an error (OOM under noeviction, a read-only replica) is not a lost event."""
    sink = make_sink(redis_server, tmp_path)
    admin = connect(redis_server.url)
    sink.record(event(1, 1, "ANNOTATION_CREATED"))
    if failure == "maxmemory":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.set("ballast", "x" * 2_000_000)
        admin.config_set("maxmemory", "1mb")
    else:
        admin.replicaof("127.0.0.1", "1")  # a replica of nothing: every write is refused with READONLY
    outcomes = [sink.record(event(i, 1, "ANNOTATION_CREATED")) for i in range(2, 7)]
    assert [o["durable"] for o in outcomes] == ["local-log"] * 5 and sink.local.pending() == 5
    if failure == "maxmemory":
        admin.config_set("maxmemory", "0")
    else:
        admin.replicaof("NO", "ONE")
    deadline = time.monotonic() + 15  # the background replayer moves the log in without a new event
    while sink.local.pending() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {c.annotation_id for c in CorrectionStore(admin).all()} == {str(i) for i in range(1, 7)}


def test_a_drain_never_shows_an_empty_log_while_events_remain(tmp_path):
    """The replayer drains the local log while requests append to it and others count it: each drain replaces the
    log at once, so nobody (and no crash) ever sees it empty with events left, and no append is lost."""
    log = EventLog(tmp_path / "pending.jsonl")
    for i in range(30):
        log.append(event(i, 1, "ANNOTATION_CREATED"))
    applied, seen, stop_reading = [], [], threading.Event()

    def apply_one_then_fail(e):
        if len(applied) == drains[0]:
            raise ConnectionError("Redis went away")  # one event per drain gets through
        applied.append(e["annotation"]["id"])

    def read():
        while not stop_reading.is_set():
            seen.append(log.pending())

    reader = threading.Thread(target=read)
    reader.start()
    drains = [0]
    for n in range(1, 21):
        drains[0] = n
        with pytest.raises(ConnectionError):  # the replayer's caller logs it and tries again later
            log.drain(apply_one_then_fail)
        log.append(event(100 + n, 1, "ANNOTATION_CREATED"))
    stop_reading.set()
    reader.join()
    assert applied == list(range(20))
    assert len(seen) > 20 and min(seen) > 0
    assert [e["annotation"]["id"] for e in log.events()] == list(range(20, 30)) + [100 + n for n in range(1, 21)]
    untouched = log.path.stat().st_ino
    drains[0] = len(applied)  # the next event fails at once
    with pytest.raises(ConnectionError):
        log.drain(apply_one_then_fail)
    assert log.path.stat().st_ino == untouched and log.pending() == 30  # nothing applied: not rewritten


def test_logged_events_are_replayed_at_start_up(redis_server, tmp_path):
    # what a backend process left in its log before it exited, with Redis down
    log = EventLog(tmp_path / "models" / "corrections" / "redis-pending.jsonl")
    log.append(event(1, 1, "ANNOTATION_CREATED"))
    log.append(event(2, 1, "ANNOTATION_CREATED"))
    sink = make_sink(redis_server, tmp_path)  # a new process: replays without waiting for a new event
    deadline = time.monotonic() + 15
    while sink.local.pending() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {c.annotation_id for c in CorrectionStore(connect(redis_server.url)).all()} == {"1", "2"}


def test_start_training_and_threshold_enqueue_one_job(redis_server, tmp_path):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    sink = make_sink(redis_server, tmp_path, train_after_corrections=5)
    for i in range(4):
        sink.record(event(i, 1, "ANNOTATION_CREATED"))
    job_id = sink.settings.keys.training_job_id
    assert not sink.redis.exists(Job.key_for(job_id))
    sink.record(event(4, 1, "ANNOTATION_CREATED"))  # the 5th new correction triggers DLD
    job = Job.fetch(job_id, connection=sink.redis, serializer=JSONSerializer)
    assert job.func_name == "workers.training.run_training"
    first = job.enqueued_at
    out = sink.record({"action": "START_TRAINING", "project": {"id": 1}})
    assert out["job_id"] == job_id  # idempotent: the queued job is reused, not duplicated
    assert Job.fetch(job_id, connection=sink.redis, serializer=JSONSerializer).enqueued_at == first
    assert sink.redis.llen(f"rq:queue:{sink.settings.keys.training_queue}") == 1


@pytest.mark.slow
def test_single_cron_process_enqueues_once(redis_server, tmp_path):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    sink = make_sink(redis_server, tmp_path)
    for i in range(3):
        sink.record(event(i, 1, "ANNOTATION_CREATED"))
    cmd = [sys.executable, "-m", "workers.cron", "--redis-url", redis_server.url, "--after-corrections", "3",
           "--check-seconds", "1"]
    logs = [open(tmp_path / f"cron{k}.log", "wb") for k in range(2)]
    crons = [subprocess.Popen(cmd, cwd=REPO, env=worker_env(tmp_path / "models"), stdout=log, stderr=subprocess.STDOUT)
             for log in logs]
    try:
        key = Job.key_for(sink.settings.keys.training_job_id)
        deadline = time.monotonic() + 30
        while not sink.redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sink.redis.exists(key), (tmp_path / "cron0.log").read_text()
        time.sleep(2.5)
        assert sink.redis.llen(f"rq:queue:{sink.settings.keys.training_queue}") == 1
        texts = [(tmp_path / f"cron{k}.log").read_text() for k in range(2)]
        assert sum("active (holds the lock)" in t for t in texts) == 1, texts
        requests = sink.redis.xlen(sink.settings.keys.training_requests)
        assert requests == 1
    finally:
        for c in crons:
            stop(c)
    assert Job.fetch(sink.settings.keys.training_job_id, connection=sink.redis,
                     serializer=JSONSerializer).kwargs["reason"].startswith("3 new corrections")


@pytest.mark.slow
def test_cron_time_schedule(redis_server, tmp_path):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    settings = WorkerSettings(redis_url=redis_server.url)
    redis = connect(redis_server.url)
    log = open(tmp_path / "cron.log", "wb")
    # every 1.8 s (0.0005 h): the first tick comes one interval after start, not at once
    cron = subprocess.Popen([sys.executable, "-m", "workers.cron", "--redis-url", redis_server.url,
                             "--every-hours", "0.0005"], cwd=REPO, env=worker_env(tmp_path / "models"),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        key = Job.key_for(settings.keys.training_job_id)
        deadline = time.monotonic() + 20
        while not redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.1)
        job = Job.fetch(settings.keys.training_job_id, connection=redis, serializer=JSONSerializer)
        assert job.kwargs["reason"] == "every 0.0005 h"
        from rq.cron import CronScheduler

        [scheduler] = CronScheduler.all(redis)
        assert (job.enqueued_at - scheduler.created_at).total_seconds() >= 0.9  # not at start-up
    finally:
        stop(cron)

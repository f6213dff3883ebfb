"""Inference workers under Redis faults: a real redis-server (AOF), a real worker process, real clicks.

The worker must survive a Redis restart, an outage and error replies (OOM), reconnect within about a second
of Redis being back, keep its name (also after ``kill -9``: a new process takes the name over), and the
backend's health must tell the truth meanwhile.
"""

from __future__ import annotations

import signal
import time

import pytest

from _workers_support import start_inference_worker, stop, wait_for_workers
from backend.app import create_app
from serving.config import Settings, WorkerSettings
from serving.images import ImageFetcher
from serving.jobs import ObjectJob, SegmentJob
from backend.settings import BackendSettings
from testbed import FileServer, RedisServer
from serving.remote import RQSegmenter
from serving.config import connect

POINT = ObjectJob(points=[[100.0, 80.0]], point_labels=[1])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def stack(tmp_path, coco_tiny):
    redis = RedisServer(tmp_path)
    redis.start()
    images = FileServer(coco_tiny / "val2017")
    names = sorted(p.name for p in (coco_tiny / "val2017").glob("*.jpg"))
    model_dir = tmp_path / "models"
    segmenter = RQSegmenter(WorkerSettings(redis.url, model_dir, deadline_ms=5000), ImageFetcher())
    state = {"redis": redis, "images": images, "names": names, "segmenter": segmenter, "model_dir": model_dir,
             "tmp": tmp_path, "worker": start_inference_worker(redis.url, model_dir, "w1", tmp_path)}
    try:
        wait_for_workers(segmenter, ["w1"])
        yield state
    finally:
        stop(state["worker"])  # a test may have replaced it (kill -9 and restart)
        images.close()
        redis.stop()


def click(stack, index: int) -> dict:
    url = stack["images"].file_url(stack["names"][index])
    job = SegmentJob(image_url=url, image_key=ImageFetcher().image_key(url), objects=[POINT])
    [result] = stack["segmenter"].segment([job])
    return result


def seconds_until_clicks_work(stack, index: int, limit: float = 30.0) -> float:
    """Seconds from now until a click succeeds (each attempt answers within its deadline)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if "error" not in click(stack, index):
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"no click succeeded within {limit:.0f}s")


def test_worker_survives_a_redis_restart_and_an_outage(stack):
    assert "error" not in click(stack, 0)
    stack["redis"].restart()  # a graceful restart: the AOF keeps the data
    recovered = seconds_until_clicks_work(stack, 1)
    assert stack["worker"].poll() is None and stack["segmenter"].alive_workers() == ["w1"]
    # an outage of a few seconds: clicks fail fast meanwhile, and work again about a second after Redis is back
    stack["redis"].stop()
    failed = click(stack, 2)
    assert failed["status"] == 503 and "Redis" in failed["error"]
    time.sleep(4)
    stack["redis"].start()
    back = seconds_until_clicks_work(stack, 3)
    assert back < 4.0, f"clicks worked again only {back:.1f}s after Redis was back"
    assert stack["worker"].poll() is None
    print(f"clicks worked again {recovered:.2f}s after a Redis restart, {back:.2f}s after a 4 s outage")


def test_worker_survives_redis_refusing_writes(stack):
    admin = connect(stack["redis"].url)
    assert "error" not in click(stack, 0)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.set("ballast", "x" * 3_000_000)
    admin.config_set("maxmemory", "1mb")  # every write now answers OOM
    refused = click(stack, 1)
    assert refused["status"] == 503 and "OutOfMemory" in refused["error"]
    time.sleep(3)  # long enough for the worker's own writes (heartbeat, RQ registries) to fail
    admin.config_set("maxmemory", "0")
    back = seconds_until_clicks_work(stack, 2)
    assert back < 5.0 and stack["worker"].poll() is None


def test_a_killed_worker_restarts_under_its_name_at_once(stack):
    stop(stack["worker"], sig=signal.SIGKILL)
    deadline = time.monotonic() + 5  # the dead worker's last heartbeat ages out (else it would count as up)
    while "w1" in stack["segmenter"].alive_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    replacement = start_inference_worker(stack["redis"].url, stack["model_dir"], "w1", stack["tmp"])
    stack["worker"] = replacement  # stopped by the fixture
    wait_for_workers(stack["segmenter"], ["w1"], timeout=60)
    assert "error" not in click(stack, 0)


def test_health_is_down_without_workers_and_counts_every_queue(stack):
    settings = BackendSettings(Settings(redis_url=stack["redis"].url, model_dir=stack["model_dir"]), preload=False)
    client = create_app(settings).test_client()
    assert client.get("/health").get_json()["status"] == "UP"
    stop(stack["worker"])
    deadline = time.monotonic() + 5
    while stack["segmenter"].alive_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    # jobs waiting in a (dead) worker's own queue are counted, not only the shared queue
    segmenter = stack["segmenter"]
    connect(stack["redis"].url).set(segmenter.settings.keys.image_route("k"), "w1")
    segmenter.redis.zadd(segmenter.settings.keys.heartbeats, {"w1": int(time.time() * 1000) + 60_000})
    segmenter.prewarm([SegmentJob(image_url="http://127.0.0.1:9/x.jpg", image_key="k", prewarm_only=True)])
    segmenter.redis.zrem(segmenter.settings.keys.heartbeats, "w1")
    health = client.get("/health")
    assert health.status_code == 503
    body = health.get_json()
    assert body["status"] == "DOWN" and body["workers"] == [] and "no inference worker" in body["error"]
    assert body["queued"] == 1 and body["queue_depth"] == {"samlight-bulk.w1": 1}


def test_a_slow_image_holds_up_only_its_own_clicks(stack):
    url = stack["images"].file_url(stack["names"][5], slow=True)  # the server answers after 4 s
    slow_job = SegmentJob(image_url=url, image_key=ImageFetcher().image_key(url), objects=[POINT])
    started = time.monotonic()
    [slow, fast] = stack["segmenter"].segment([slow_job, SegmentJob(
        image_url=stack["images"].file_url(stack["names"][6]), image_key=ImageFetcher().image_key(
            stack["images"].file_url(stack["names"][6])), objects=[POINT])])
    assert "error" not in fast, fast
    assert slow["status"] == 504 and "still downloading" in slow["error"]
    assert time.monotonic() - started < 4.0  # neither waited for the slow server
    time.sleep(4.5)  # the download finished in the background: the next click on it is served
    [again] = stack["segmenter"].segment([slow_job])
    assert "error" not in again, again

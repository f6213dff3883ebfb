"""Corrections from Label Studio webhooks: a durable Redis stream plus a deduplicated view.

* ``Keys.correction_stream`` — every accepted change, append-only (Redis runs with AOF).
* ``Keys.corrections`` — hash annotation id -> latest correction (JSON); the training job reads it.
* A create/update is applied only when its ``updated_at`` is newer than the stored one, so redelivered
  and replayed events merge; a deletion removes the correction and leaves a tombstone so that a late or
  replayed create of the same annotation cannot bring it back.
* When Redis cannot take an event (down, timing out, or answering an error such as OOM or READONLY), it goes
  to a local append-only log (``MODEL_DIR/corrections/redis-pending.jsonl``, fsynced) and is replayed, in
  order, at start-up and in the background until the log is empty (and before every new event).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from serving.config import Keys, WorkerSettings, connect
from serving.corrections import EventLog

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}
DELETE_EVENTS = {"ANNOTATIONS_DELETED", "ANNOTATION_DELETED"}
TRAIN_EVENTS = {"START_TRAINING"}

# KEYS: hash, stream, counter, tombstones; ARGV: id, updated_at, correction JSON
_UPSERT = """
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return 0 end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local stored = cjson.decode(current)['updated_at']
  if type(stored) == 'string' and stored >= ARGV[2] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'op', 'upsert', 'id', ARGV[1], 'updated_at', ARGV[2], 'data', ARGV[3])
redis.call('INCR', KEYS[3])
return 1
"""

# KEYS: hash, stream, tombstones; ARGV: id, time
_DELETE = """
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'op', 'delete', 'id', ARGV[1])
return removed
"""


@dataclass
class Correction:
    """One corrected annotation, as the training job needs it."""

    annotation_id: str
    task_id: int | None
    updated_at: str
    image: str | None  # the task's image URL (resolved against LABEL_STUDIO_URL by the fetcher)
    result: list  # Label Studio result items (brushlabels with rle, rectangles, ...)
    project: int | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Correction":
        return cls(**json.loads(text))


def configured_image_url(event: dict) -> str | None:
    """The image URL the backend found by the labeling config's rule (``event["samlight"]["image_url"]``)."""
    extra = event.get("samlight")
    url = extra.get("image_url") if isinstance(extra, dict) else None
    return url if isinstance(url, str) else None


def image_url(task: dict) -> str | None:
    """A guess, for events recorded without the labeling config's answer (older logs, other senders)."""
    data = task.get("data") or {}
    for key in ("image", "img", "url"):
        if isinstance(data.get(key), str):
            return data[key]
    strings = [v for v in data.values() if isinstance(v, str)]
    return strings[0] if strings else None


def correction_from_event(event: dict) -> Correction:
    annotation = event.get("annotation")
    if not isinstance(annotation, dict) or "id" not in annotation:
        raise ValueError("annotation event without annotation.id")
    task = event.get("task") if isinstance(event.get("task"), dict) else {}
    task_id = task.get("id", annotation.get("task"))
    project = event.get("project")
    updated = annotation.get("updated_at") or annotation.get("created_at") or ""
    return Correction(
        annotation_id=str(annotation["id"]),
        task_id=task_id,
        updated_at=str(updated),
        image=configured_image_url(event) or image_url(task),
        result=annotation.get("result") or [],
        project=project.get("id") if isinstance(project, dict) else project,
    )


def deleted_ids(event: dict) -> list[str]:
    items = event.get("annotations") or ([event["annotation"]] if isinstance(event.get("annotation"), dict) else [])
    return [str(item["id"]) for item in items if isinstance(item, dict) and "id" in item]


class CorrectionStore:
    """Reads and writes the Redis side (no fallback here; see :class:`RedisCorrectionSink`)."""

    def __init__(self, redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self._upsert = redis.register_script(_UPSERT)
        self._delete = redis.register_script(_DELETE)

    def apply(self, event: dict) -> dict:
        action = event.get("action")
        if action in ANNOTATION_EVENTS:
            correction = correction_from_event(event)
            k = self.keys
            stored = self._upsert(
                keys=[k.corrections, k.correction_stream, k.corrections_since_training, k.corrections + ":deleted"],
                args=[correction.annotation_id, correction.updated_at, correction.to_json()],
            )
            return {"action": action, "id": correction.annotation_id, "stored": bool(stored)}
        if action in DELETE_EVENTS:
            k = self.keys
            removed = 0
            for annotation_id in deleted_ids(event):
                removed += int(self._delete(keys=[k.corrections, k.correction_stream, k.corrections + ":deleted"],
                                            args=[annotation_id, str(time.time())]))
            return {"action": action, "removed": removed}
        return {"action": action, "ignored": True}

    def all(self) -> list[Correction]:
        return [Correction.from_json(v) for _, v in sorted(self.redis.hgetall(self.keys.corrections).items())]

    def count(self) -> int:
        return int(self.redis.hlen(self.keys.corrections))

    def new_since_training(self) -> int:
        return int(self.redis.get(self.keys.corrections_since_training) or 0)

    def mark_trained(self, consumed: int) -> None:
        """Subtract what a training run consumed (corrections that arrive during training still count)."""
        self.redis.decrby(self.keys.corrections_since_training, consumed)


class RedisCorrectionSink:
    """The backend's correction sink when ``REDIS_URL`` is set (falls back to the local log)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, timeout_s=1.0)
        self.store = CorrectionStore(self.redis, settings.keys)
        self.local = EventLog(settings.corrections_dir / "redis-pending.jsonl")
        self._replayer: threading.Thread | None = None
        self._replayer_lock = threading.Lock()
        if self.local.pending():  # events a previous process could not store: replay them without waiting
            self._start_replayer()

    def record(self, event: dict) -> dict:
        """Store one webhook event; never raises for Redis failures (the event is logged locally)."""
        import redis

        action = event.get("action")
        if action in ANNOTATION_EVENTS:
            correction_from_event(event)  # validate before accepting (ValueError -> 400)
        try:
            self.replay()
            if action in TRAIN_EVENTS:
                from serving.schedule import enqueue_training

                job = enqueue_training(self.redis, self.settings, reason="START_TRAINING")
                return {"action": action, "job_id": job.id, "status": str(job.get_status())}
            outcome = self.store.apply(event)
            self._maybe_train()
            return dict(outcome, durable="redis")
        except redis.RedisError as error:  # connection, timeout, and error replies (OOM, READONLY, ...)
            log.warning("Redis could not take the event (%s: %s): %s kept in the local log",
                        error.__class__.__name__, error, action)
            self.local.append(event)
            self._start_replayer()
            return {"action": action, "durable": "local-log"}

    def _start_replayer(self, interval_s: float = 2.0) -> None:
        """Replay the local log in the background once Redis is back, even if no new event arrives."""
        with self._replayer_lock:
            if self._replayer is not None and self._replayer.is_alive():
                return

            def loop():
                while self.local.pending():
                    try:
                        self.replay()
                    except Exception as error:  # still failing: try again later
                        log.debug("replay postponed: %s", error)
                        time.sleep(interval_s)

            self._replayer = threading.Thread(target=loop, name="corrections-replay", daemon=True)
            self._replayer.start()

    # the backend's CorrectionSink protocol
    __call__ = record

    def _maybe_train(self) -> None:
        threshold = self.settings.train_after_corrections
        if threshold > 0 and self.store.new_since_training() >= threshold:
            from serving.schedule import enqueue_training

            enqueue_training(self.redis, self.settings, reason=f">= {threshold} new corrections")

    def replay(self) -> int:
        """Move locally logged events into Redis (idempotent thanks to the dedup rules)."""
        if self.local.pending() == 0:
            return 0

        def apply(event):
            if event.get("action") in TRAIN_EVENTS:
                from serving.schedule import enqueue_training

                enqueue_training(self.redis, self.settings, reason="START_TRAINING (replayed)")
            else:
                try:
                    self.store.apply(event)
                except ValueError as error:  # never valid (events are checked before they are logged)
                    log.error("dropping an unreadable logged correction event: %s", error)

        replayed = self.local.drain(apply)
        if replayed:
            log.info("replayed %d locally logged correction events into Redis", replayed)
        return replayed

    def health(self) -> dict:
        return {"pending_local": self.local.pending()}

"""The learning loop without Redis (the embedded mode): ``python -m serving.local_training``.

The backend records webhook events in ``MODEL_DIR/corrections/events.jsonl``. Here they are read back as
corrections (``EventLogCorrections``: the latest version of each annotation, deletions applied), and one
``serving.training.train`` run distils and gates a new version into ``MODEL_DIR/versions`` and activates it
(``MODEL_DIR/ACTIVE``); every backend process notices the new active version and hot-reloads it
(``serving.segmenter``). ``LocalTrainingScheduler`` (a thread in each backend process) starts this process
when Label Studio's Train button is pressed (a START_TRAINING event), after ``SAMLIGHT_TRAIN_AFTER_CORRECTIONS``
new corrections, or every ``SAMLIGHT_TRAIN_EVERY_HOURS`` hours.

Two runs never overlap: a run holds an exclusive lock on ``MODEL_DIR/training/lock`` (a second one exits at
once). A run killed midway is resumed by the next one (the run directory is named by its data, and
``fine_tune`` resumes from its checkpoints). State: ``MODEL_DIR/training/state.json`` (annotation events and
START_TRAINING requests already consumed, the last run's summary), ``refused.json`` (runs the gate refused).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from serving.config import Settings
from serving.correction_stream import (ANNOTATION_EVENTS, DELETE_EVENTS, TRAIN_EVENTS, Correction,
                                       correction_from_event, deleted_ids)
from serving.corrections import EventLog, FileCorrectionSink
from serving.statefiles import pid_alive, read_json, write_json

log = logging.getLogger(__name__)


class TrainingState:
    """``MODEL_DIR/training/state.json``: what runs consumed, and the last run's outcome."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "state.json"

    def read(self) -> dict:
        return read_json(self.path)

    def update(self, **values) -> None:
        write_json(self.path, {**self.read(), **values})


class EventLogCorrections:
    """The ``Corrections`` of ``serving.training`` over the backend's event log."""

    def __init__(self, events: EventLog, state: TrainingState) -> None:
        self.events, self.state = events, state
        self._scanned: tuple[tuple, tuple] | None = None  # (the log's size and mtime, what they gave)

    def scan(self) -> tuple[dict[str, Correction], int, int]:
        """(corrections by annotation id, annotation events seen, START_TRAINING requests seen); the log is
        read again only when it changed (the scheduler asks every few seconds, /health on every call)."""
        try:
            stat = self.events.path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if self._scanned is None or self._scanned[0] != stamp:
            self._scanned = (stamp, self._read())
        return self._scanned[1]

    def _read(self) -> tuple[dict[str, Correction], int, int]:
        corrections: dict[str, Correction] = {}
        annotation_events = requests = 0
        for event in self.events.events():
            action = event.get("action")
            if action in ANNOTATION_EVENTS:
                try:
                    correction = correction_from_event(event)
                except ValueError:
                    continue
                annotation_events += 1
                known = corrections.get(correction.annotation_id)
                if known is None or correction.updated_at >= known.updated_at:
                    corrections[correction.annotation_id] = correction
            elif action in DELETE_EVENTS:
                for annotation_id in deleted_ids(event):
                    corrections.pop(annotation_id, None)
            elif action in TRAIN_EVENTS:
                requests += 1
        return corrections, annotation_events, requests

    def all(self) -> list[Correction]:
        return [c for _, c in sorted(self.scan()[0].items())]

    def new_since_training(self) -> int:
        return self.scan()[1] - int(self.state.read().get("trained_events", 0))

    def mark_trained(self, consumed: int) -> None:
        self.state.update(trained_events=int(self.state.read().get("trained_events", 0)) + consumed)


class FileRefused:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __contains__(self, digest: str) -> bool:
        return digest in read_json(self.path)

    def add(self, digest: str) -> None:
        write_json(self.path, {**read_json(self.path), digest: time.time()})


@contextmanager
def exclusive(path: Path):
    """Yields True while this process holds the lock on ``path``, False (at once) when another does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def training_dir(settings: Settings) -> Path:
    return Path(settings.model_dir) / "training"


def run_once(settings: Settings, reason: str) -> dict:
    """One run under the lock; ``{"status": "busy"}`` when another run holds it."""
    from serving.registry import ModelRegistry
    from serving.training import train

    directory = training_dir(settings)
    state = TrainingState(directory)
    with exclusive(directory / "lock") as mine:
        if not mine:
            return {"status": "busy", "why": "another training run holds the lock"}
        corrections = EventLogCorrections(FileCorrectionSink(settings.corrections_dir).log, state)
        requests = corrections.scan()[2]
        state.update(running={"pid": os.getpid(), "since": time.time(), "reason": reason})
        try:
            summary = train(settings, settings.training, corrections, ModelRegistry(settings.model_dir),
                            FileRefused(directory / "refused.json"), reason)
        except Exception as error:
            summary = {"status": "failed", "why": f"{error.__class__.__name__}: {error}", "reason": reason}
            log.exception("training run failed")
        state.update(running=None, handled_requests=requests, last_run_at=time.time(),
                     last=_brief(summary))
        return summary


def _brief(summary: dict) -> dict:
    """What /health shows of a run."""
    metrics = summary.get("metrics") or {}
    return {key: value for key, value in {
        "status": summary.get("status"), "version": summary.get("version"), "reason": summary.get("reason"),
        "why": summary.get("why") or (metrics.get("gate") or {}).get("why"),
        "teacher_fidelity": metrics.get("teacher_fidelity"), "finished_at": time.time()}.items() if value is not None}


class LocalTrainingScheduler:
    """Starts ``python -m serving.local_training`` when a trigger fires; one thread per backend process (the
    run's lock keeps a second process's start from overlapping)."""

    def __init__(self, settings: Settings, check_s: float = 2.0) -> None:
        self.settings = settings
        self.check_s = check_s
        self.directory = training_dir(settings)
        self.state = TrainingState(self.directory)
        self.corrections = EventLogCorrections(FileCorrectionSink(settings.corrections_dir).log, self.state)
        self._process: subprocess.Popen | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="training-schedule", daemon=True)
        thread.start()
        return thread

    def health(self) -> dict:
        state = self.state.read()
        running = state.get("running")
        return {key: value for key, value in {
            "running": running if running and pid_alive(running.get("pid")) else None,
            "last": state.get("last"), "new_corrections": self.corrections.new_since_training()}.items()
            if value is not None}

    def due(self) -> str | None:
        """Why a run should start now, or None."""
        state = self.state.read()
        _, annotation_events, requests = self.corrections.scan()
        if requests > int(state.get("handled_requests", 0)):
            return "START_TRAINING"
        new = annotation_events - int(state.get("trained_events", 0))
        after = self.settings.rq.train_after_corrections
        if after > 0 and new >= after:
            return f">= {after} new corrections"
        every_s = self.settings.rq.train_every_hours * 3600
        if every_s > 0 and new > 0 and time.time() - float(state.get("last_run_at", 0)) >= every_s:
            return f"every {self.settings.rq.train_every_hours:g} h"
        return None

    def _loop(self) -> None:
        while True:
            time.sleep(self.check_s)
            try:
                if self._process is not None and self._process.poll() is None:
                    continue
                with exclusive(self.directory / "lock") as free:
                    reason = self.due() if free else None
                if reason:
                    log.info("starting a training run (%s)", reason)
                    self._process = subprocess.Popen([sys.executable, "-m", "serving.local_training", "--reason",
                                                      reason], start_new_session=True)
            except Exception:  # noqa: BLE001 - the schedule must outlive one bad check
                log.exception("training schedule check failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.local_training", description=__doc__.split("\n")[0])
    parser.add_argument("--reason", default="manual")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_once(settings, args.reason)
    print(json.dumps(_brief(summary)))
    return 0 if summary.get("status") not in ("failed",) else 1


if __name__ == "__main__":
    raise SystemExit(main())

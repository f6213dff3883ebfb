"""Model registry under ``MODEL_DIR/versions``: immutable versions, the active one in Redis.

A version is a directory ``MODEL_DIR/versions/<version>/`` holding the student checkpoint written by
``samlight.checkpoints.save_student`` (``model.safetensors`` + ``config.json`` with the sha256) and
``version.json`` (version, parent, sha256, config name, metrics, created_at). The active version is the
Redis key ``Keys.active_version`` (mirrored to ``MODEL_DIR/ACTIVE`` so a restart without Redis still knows
it); publishing sends a message on ``Keys.version_channel`` so workers reload at once. Nothing here imports
torch except :meth:`ModelRegistry.save_version` and :meth:`ModelRegistry.load`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.config import Keys

VERSION_FILE = "version.json"
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def model_role(version: str) -> str:
    """``"teacher"`` when a version names SAM itself (``vit_b-…``, ``sam-…``, ``random-vit_b-0``: served until the
    learning loop's first student), else ``"student"``."""
    name = version.removeprefix("random-")
    return "teacher" if name.startswith(("vit_", "sam-")) else "student"


class RegistryError(ValueError):
    """Unknown, corrupt or mismatched version."""


@dataclass
class ModelVersion:
    version: str
    sha256: str
    config: str
    parent: str | None = None
    created_at: float = field(default_factory=time.time)
    metrics: dict = field(default_factory=dict)
    source: str = ""  # "training", "import", ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelVersion":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class ModelRegistry:
    def __init__(self, model_dir: str | os.PathLike, redis=None, keys: Keys | None = None) -> None:
        self.root = Path(model_dir) / "versions"
        self.active_file = Path(model_dir) / "ACTIVE"
        self.redis = redis
        self.keys = keys or Keys()

    # --- reading --------------------------------------------------------------------------------

    def path(self, version: str) -> Path:
        if not _VERSION_NAME.match(version or ""):
            raise RegistryError(f"invalid version name {version!r}")
        return self.root / version

    def get(self, version: str) -> ModelVersion:
        file = self.path(version) / VERSION_FILE
        try:
            return ModelVersion.from_dict(json.loads(file.read_text()))
        except FileNotFoundError:
            raise RegistryError(f"unknown model version {version!r}") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise RegistryError(f"{file}: corrupt version record: {error}") from None

    def versions(self) -> list[ModelVersion]:
        """All versions, oldest first (unreadable directories are skipped)."""
        found = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(".") or not (entry / VERSION_FILE).exists():
                    continue
                try:
                    found.append(self.get(entry.name))
                except RegistryError:
                    continue
        return sorted(found, key=lambda v: (v.created_at, v.version))

    def active(self) -> str | None:
        """The active version: Redis first, the ``ACTIVE`` file when Redis is unreachable or empty."""
        if self.redis is not None:
            try:
                value = self.redis.get(self.keys.active_version)
                if value:
                    return value.decode()
            except Exception:  # Redis down: the file mirror answers
                pass
        try:
            return self.active_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def last_good(self) -> str | None:
        """The last version a worker loaded and served (``mark_served``): where a restarted worker goes back
        to when the active version cannot be loaded."""
        if self.redis is not None:
            try:
                value = self.redis.get(self.keys.last_good_version)
                if value:
                    return value.decode()
            except Exception:
                pass
        try:
            return (self.active_file.parent / "LAST_GOOD").read_text().strip() or None
        except FileNotFoundError:
            return None

    def mark_served(self, version: str) -> None:
        file = self.active_file.parent / "LAST_GOOD"
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp")
            tmp.write_text(version + "\n")
            os.replace(tmp, file)
        except OSError:
            pass
        if self.redis is not None:
            try:
                self.redis.set(self.keys.last_good_version, version)
            except Exception:
                pass

    def describe(self) -> dict:
        """What ``GET /versions`` shows."""
        active = self.active()
        return {
            "active": active,
            "versions": [dict(v.to_dict(), active=v.version == active) for v in self.versions()],
        }

    # --- writing --------------------------------------------------------------------------------

    def new_version_name(self, config_name: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        name = f"{config_name}-{stamp}"
        suffix = 1
        while self.path(name).exists():
            suffix += 1
            name = f"{config_name}-{stamp}-{suffix}"
        return name

    def save_version(self, model, config, parent: str | None, metrics: dict | None = None, source: str = "",
                     version: str | None = None) -> ModelVersion:
        """Write a new (not yet active) version from an in-memory student."""
        from samlight.checkpoints import save_student

        version = version or self.new_version_name(config.name)
        directory = self.path(version)
        if directory.exists():
            raise RegistryError(f"model version {version!r} already exists")
        record = ModelVersion(version=version, sha256="", config=config.name, parent=parent,
                              metrics=metrics or {}, source=source)
        record.sha256 = save_student(model, config, directory, metadata={"version": version, "parent": parent})
        self._write_record(record)
        return record

    def import_checkpoint(self, checkpoint_dir: str | os.PathLike, parent: str | None, metrics: dict | None = None,
                          source: str = "", version: str | None = None) -> ModelVersion:
        """Copy a student checkpoint directory (``save_student`` layout) into the registry."""
        import shutil

        from samlight.checkpoints import read_student_manifest, sha256_file, WEIGHTS_FILE

        checkpoint_dir = Path(checkpoint_dir)
        manifest = read_student_manifest(checkpoint_dir)
        digest = sha256_file(checkpoint_dir / WEIGHTS_FILE)
        if digest != manifest.get("sha256"):
            raise RegistryError(f"{checkpoint_dir}: weights do not match their recorded sha256")
        config_name = manifest.get("config", {}).get("name", "student")
        version = version or self.new_version_name(config_name)
        directory = self.path(version)
        staging = directory.with_name(f".{version}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        record = ModelVersion(version=version, sha256=digest, config=config_name, parent=parent,
                              metrics=metrics or {}, source=source)
        (staging / VERSION_FILE).write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        os.replace(staging, directory)
        return record

    def _write_record(self, record: ModelVersion) -> None:
        file = self.path(record.version) / VERSION_FILE
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, file)

    def update_metrics(self, version: str, metrics: dict) -> ModelVersion:
        record = self.get(version)
        record.metrics.update(metrics)
        self._write_record(record)
        return record

    def verify(self, version: str) -> ModelVersion:
        """Check the record and the weights' sha256 without building the model."""
        from samlight.checkpoints import CheckpointError, WEIGHTS_FILE, read_student_manifest, sha256_file

        record = self.get(version)
        directory = self.path(version)
        try:
            manifest = read_student_manifest(directory)
        except CheckpointError as error:
            raise RegistryError(str(error)) from None
        weights = directory / WEIGHTS_FILE
        if not weights.exists():
            raise RegistryError(f"{weights}: weights file is missing")
        digest = sha256_file(weights)
        if digest != record.sha256 or digest != manifest.get("sha256"):
            raise RegistryError(f"version {version}: weights sha256 {digest[:12]}… does not match its record")
        return record

    def activate(self, version: str) -> ModelVersion:
        """Make ``version`` active: verified first, then Redis key + file mirror + pub/sub nudge."""
        record = self.verify(version)
        tmp = self.active_file.with_suffix(".tmp")
        self.active_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(version + "\n")
        os.replace(tmp, self.active_file)
        if self.redis is not None:
            with self.redis.pipeline() as pipe:
                pipe.set(self.keys.active_version, version)
                pipe.publish(self.keys.version_channel, json.dumps({"event": "activate", "version": version}))
                pipe.execute()
        return record

    def load(self, version: str, map_location: str = "cpu"):
        """Build the model of ``version`` (sha256 verified by ``load_student``); RegistryError when it is bad."""
        from samlight.checkpoints import CheckpointError, load_student

        record = self.get(version)
        try:
            checkpoint = load_student(self.path(version), map_location=map_location)
        except CheckpointError as error:
            raise RegistryError(f"version {version}: {error}") from None
        if checkpoint.sha256 != record.sha256:
            raise RegistryError(f"version {version}: checkpoint sha256 does not match its version record")
        return checkpoint

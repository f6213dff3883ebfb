"""Model registry: versions on disk, the active one in Redis (+ file mirror), verification on activate/load."""

from __future__ import annotations

import json

import pytest

from serving.registry import ModelRegistry, RegistryError
from serving.config import connect


def test_versions_activate_and_reject_bad_checkpoints(redis_server, tmp_path, test_student):
    from samlight.checkpoints import CONFIG_FILE, sha256_file
    from samlight.modeling import student_config

    redis = connect(redis_server.url)
    registry = ModelRegistry(tmp_path / "models", redis)
    config = student_config("lightening_test")
    assert registry.active() is None and registry.describe() == {"active": None, "versions": []}
    first = registry.save_version(test_student, config, parent=None, metrics={"miou": 0.5}, source="test")
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("samlight:model:events")
    registry.activate(first.version)
    message = None
    for _ in range(20):  # the first read may be the (ignored) subscribe confirmation
        message = message or pubsub.get_message(timeout=0.2)
    assert json.loads(message["data"]) == {"event": "activate", "version": first.version}
    assert registry.active() == first.version == (tmp_path / "models" / "ACTIVE").read_text().strip()
    assert registry.load(first.version).sha256 == first.sha256

    # the imported copy of a checkpoint keeps its hash and records its parent
    second = registry.import_checkpoint(registry.path(first.version), parent=first.version, version="second")
    assert second.sha256 == first.sha256 and registry.get("second").parent == first.version
    described = registry.describe()
    assert [v["version"] for v in described["versions"]] == [first.version, "second"]
    assert [v["active"] for v in described["versions"]] == [True, False]

    # mismatched: weights of lightening_test under a config that says lightening_t (hash intact)
    mismatched = registry.import_checkpoint(registry.path(first.version), parent=None, version="mismatched")
    manifest_path = registry.path("mismatched") / CONFIG_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["config"] = student_config("lightening_t").to_dict()
    manifest_path.write_text(json.dumps(manifest))
    assert registry.verify("mismatched").sha256 == sha256_file(registry.path("mismatched") / "model.safetensors")
    with pytest.raises(RegistryError, match="does not match"):
        registry.load(mismatched.version)

    # corrupt weights: refused before they become active; the active version is unchanged
    with open(registry.path("second") / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    with pytest.raises(RegistryError, match="sha256"):
        registry.activate("second")
    assert registry.active() == first.version
    with pytest.raises(RegistryError):
        registry.get("../etc")
    with pytest.raises(RegistryError, match="unknown"):
        registry.activate("nope")

    # Redis down: the file mirror still answers
    redis_server.stop()
    assert ModelRegistry(tmp_path / "models", connect(redis_server.url, timeout_s=0.3)).active() == first.version

"""docker/ compose files: compose-spec schema, the per-GPU generator, the stack's invariants, entry points.

No Docker engine is needed: the schema is the compose specification's JSON schema (vendored by the pinned
check-jsonschema package), the entry points are checked against the code. When a Compose v2 binary is on
this machine (`docker compose` or `docker-compose`), `config` runs too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from docker_checks import DOCKER, REPO, compose_variables, env_example_names

MAIN = DOCKER / "docker-compose.yml"
GPUS = DOCKER / "docker-compose.gpus.yml"
WORKERS = DOCKER / "docker-compose.workers.yml"
TEMPLATES = [DOCKER / "services.yml", DOCKER / "services-remote.yml"]
GEN = DOCKER / "gen-compose.py"
CHECKED_IN = [MAIN, GPUS, WORKERS, *TEMPLATES]


@pytest.fixture(scope="module")
def compose_validator():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def schema_errors(validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the generator on a copy of docker/ (so the relative `extends` paths stay real)."""
    copy = tmp_path / "repo" / "docker"
    if not copy.exists():
        shutil.copytree(DOCKER, copy)
    return subprocess.run([sys.executable, str(copy / GEN.name), *args], capture_output=True, text=True, timeout=30)


def main_stack(gpus_file: Path = GPUS) -> dict[str, dict]:
    """The main host's services (docker-compose.yml + the per-GPU file, `extends` resolved by hand)."""
    services = dict(load(MAIN)["services"])
    for name, service in load(gpus_file)["services"].items():
        base = load(gpus_file.parent / service["extends"]["file"])["services"][service["extends"]["service"]]
        services[name] = {**base, **{k: v for k, v in service.items() if k != "extends"}}
    return services


# ---- schema --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CHECKED_IN, ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(compose_validator, path):
    assert schema_errors(compose_validator, load(path)) == []


def test_schema_check_catches_mistakes(compose_validator):
    broken = load(MAIN)
    broken["services"]["backend"]["stop_grace_period"] = {"seconds": 30}
    broken["services"]["redis"]["restart_policy"] = "always"  # not a service key
    errors = schema_errors(compose_validator, broken)
    assert any("stop_grace_period" in e for e in errors) and any("restart_policy" in e for e in errors), errors


def test_generated_files_match_the_compose_spec(compose_validator, tmp_path):
    for args, name in ((["--gpus", "0,1,2,3"], "docker-compose.gpus.yml"),
                       (["--remote", "--gpus", "0,3"], "docker-compose.remote-gpus.yml")):
        result = generate(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert schema_errors(compose_validator, load(tmp_path / "repo" / "docker" / name)) == []


# ---- the per-GPU generator ---------------------------------------------------------------------------

def test_checked_in_gpu_file_is_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(GEN), "--gpus", "0", "--check"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


def test_one_service_per_gpu_pinned_by_device_id(tmp_path):
    result = generate(tmp_path, "--gpus", "0,1,2,3")
    assert result.returncode == 0, result.stderr
    gpus_file = tmp_path / "repo" / "docker" / "docker-compose.gpus.yml"
    services = load(gpus_file)["services"]
    assert list(services) == [f"inference-gpu{i}" for i in range(4)]
    pinned = {}
    for name, service in services.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        pinned[name] = device["device_ids"]
        # the container sees only its GPU, as index 0
        assert service["command"] == ["python", "-m", "workers.inference", "--gpu", "0"]
        assert service["extends"] == {"file": "services.yml", "service": "inference"}
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert pinned == {f"inference-gpu{i}": [str(i)] for i in range(4)}
    assert len({s["hostname"] for s in services.values()}) == 4
    # --check now fails against the copy's changed file, and passes for the matching layout
    copy_gen = tmp_path / "repo" / "docker" / GEN.name
    stale = subprocess.run([sys.executable, str(copy_gen), "--gpus", "0", "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    fresh = subprocess.run([sys.executable, str(copy_gen), "--gpus", "0,1,2,3", "--check"], capture_output=True)
    assert fresh.returncode == 0


def test_remote_services_join_a_remote_redis(tmp_path):
    result = generate(tmp_path, "--remote", "--gpus", "1,GPU-8f2c1d3e-aaaa-bbbb")
    assert result.returncode == 0, result.stderr
    services = load(tmp_path / "repo" / "docker" / "docker-compose.remote-gpus.yml")["services"]
    assert set(services) == {"inference-gpu1", "inference-gpu-8f2c1d3e-aaaa-bbbb"}
    template = load(DOCKER / "services-remote.yml")["services"]["inference-remote"]
    for service in services.values():
        assert service["extends"] == {"file": "services-remote.yml", "service": "inference-remote"}
        assert "depends_on" not in service  # no local redis on an extra host
        assert "SAMLIGHT_HOST_LABEL:?" in service["hostname"]
    # REDIS_URL / LABEL_STUDIO_URL must come from that host's .env, not point at a local service
    assert "REDIS_URL" not in template["environment"] and "LABEL_STUDIO_URL" not in template["environment"]
    assert any(str(v).endswith(":/models:ro") and "MODEL_HOST_DIR:?" in str(v) for v in template["volumes"])


@pytest.mark.parametrize("spec, message", [("", "at least one"), ("0,0", "twice"), ("0;1", "not a GPU"),
                                           ("cuda:0", "not a GPU")])
def test_generator_rejects_bad_gpu_lists(tmp_path, spec, message):
    result = generate(tmp_path, "--gpus", spec)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_generator_all_needs_nvidia_smi(tmp_path):
    copy = tmp_path / "repo" / "docker"
    shutil.copytree(DOCKER, copy)
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"))
    result = subprocess.run([sys.executable, str(copy / GEN.name), "--gpus", "all"], capture_output=True,
                            text=True, env=env, timeout=30)
    assert result.returncode == 2 and "nvidia-smi" in result.stderr


def test_generator_all_uses_every_gpu_nvidia_smi_lists(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    fake.chmod(0o755)
    copy = tmp_path / "repo" / "docker"
    shutil.copytree(DOCKER, copy)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run([sys.executable, str(copy / GEN.name), "--gpus", "all"], capture_output=True,
                            text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert list(load(copy / "docker-compose.gpus.yml")["services"]) == ["inference-gpu0", "inference-gpu1",
                                                                        "inference-gpu2"]


# ---- the stack ---------------------------------------------------------------------------------------

def test_stack_services_and_invariants():
    services = main_stack()
    assert {"redis", "label-studio", "backend", "trainer", "cron", "rq-dashboard", "inference-gpu0"} <= set(services)
    cron = [n for n, s in services.items() if s.get("command", [None])[:3] == ["python", "-m", "workers.cron"]]
    assert cron == ["cron"], "exactly one cron process"
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert "stop_grace_period" in service, name
        if "command" in service:
            assert isinstance(service["command"], list), f"{name}: exec-form command"
        if name not in ("redis", "label-studio"):
            assert service.get("init") is True, f"{name}: tini forwards SIGTERM"
            assert "healthcheck" in service or name in ("backend", "trainer"), f"{name}: healthcheck"
            assert {"path": "../.env", "required": True} in service["env_file"], name
    # long jobs: the trainer's grace period is configurable and long by default
    assert services["trainer"]["stop_grace_period"] == "${TRAINER_STOP_GRACE:-15m}"
    (device,) = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["${TRAINER_GPU:-0}"]


def test_redis_is_persistent_and_password_protected():
    redis = load(MAIN)["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name, service in main_stack().items():
        url = (service.get("environment") or {}).get("REDIS_URL")
        if url:
            assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), name


def test_label_studio_lets_a_same_network_backend_in():
    ls = load(MAIN)["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    env = ls["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    assert env["SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # the backend's token is the admin's token Label Studio creates on first start
    assert env["LABEL_STUDIO_USER_TOKEN"].startswith("${LABEL_STUDIO_API_KEY:?")
    assert any(v.endswith(":/label-studio/data") for v in ls["volumes"])
    stack = main_stack()
    for name in ("backend", "trainer", "inference-gpu0"):
        assert stack[name]["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080", name
        assert "models:/models" in stack[name]["volumes"], name


def test_declared_volumes_cover_every_named_volume():
    compose = load(MAIN)
    declared = set(compose["volumes"])
    used = set()
    for service in main_stack().values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith(("/", ".", "$")):
                used.add(source)
    assert used == declared


# ---- entry points exist in the code -------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})
    for dist in ("gunicorn", "rq-dashboard", "rq"):
        for entry in importlib.metadata.distribution(dist).entry_points:
            if entry.group == "console_scripts":
                scripts.setdefault(entry.name, entry.value)
    return scripts


def _check_command(command: list[str]) -> list[str]:
    """Problems with one exec-form command run from /app (the repository root in the images)."""
    problems = []
    if command[:2] == ["python", "-m"]:
        module = command[2]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return [f"module {module} not found"]
        source = Path(spec.origin).read_text()
        if '__name__ == "__main__"' not in source and "__name__ == '__main__'" not in source:
            problems.append(f"module {module} has no __main__ block")
        return problems
    if command[0] == "python":
        script = command[1]
        path = REPO / script.removeprefix("/app/")
        return [] if path.is_file() else [f"script {script} missing"]
    scripts = _console_scripts()
    if command[0] not in scripts:
        return [f"console script {command[0]} is declared nowhere"]
    if command[0] == "gunicorn":
        config = command[command.index("-c") + 1]
        if not (REPO / config).is_file():
            problems.append(f"gunicorn config {config} missing")
        module, _, factory = command[-1].partition(":")
        spec = importlib.util.find_spec(module)
        if spec is None or f"def {factory.removesuffix('()')}(" not in Path(spec.origin).read_text():
            problems.append(f"gunicorn app {command[-1]} not found")
    return problems


def _image_cmd(dockerfile: Path, instruction: str) -> list[str]:
    lines = dockerfile.read_text().replace("\\\n", " ").splitlines()
    found = [line for line in lines if line.startswith(instruction + " ")]
    text = found[-1].split(None, 1)[1]
    if instruction == "HEALTHCHECK":
        text = text[text.index("CMD") + 3:]
    return json.loads(text)


def test_every_command_exists_in_the_code():
    commands = {"Dockerfile.backend CMD": _image_cmd(DOCKER / "Dockerfile.backend", "CMD"),
                "Dockerfile.gpu CMD": _image_cmd(DOCKER / "Dockerfile.gpu", "CMD"),
                "Dockerfile.backend HEALTHCHECK": _image_cmd(DOCKER / "Dockerfile.backend", "HEALTHCHECK"),
                "Dockerfile.gpu HEALTHCHECK": _image_cmd(DOCKER / "Dockerfile.gpu", "HEALTHCHECK")}
    for name, service in main_stack().items():
        if "command" in service and name != "redis":
            commands[f"{name} command"] = service["command"]
        test = (service.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD" and test[1] == "python":
            commands[f"{name} healthcheck"] = test[1:]
    problems = {name: p for name, command in commands.items() if (p := _check_command(command))}
    assert problems == {}
    assert {"Dockerfile.backend", "Dockerfile.gpu", "trainer", "cron"} <= {n.split()[0] for n in commands}


def test_entry_point_check_catches_a_missing_module():
    assert _check_command(["python", "-m", "workers.no_such_worker"]) == ["module workers.no_such_worker not found"]
    assert _check_command(["samlight-nope"]) == ["console script samlight-nope is declared nowhere"]
    assert _check_command(["gunicorn", "-c", "backend/nope.py", "backend.app:nope()"]) == [
        "gunicorn config backend/nope.py missing", "gunicorn app backend.app:nope() not found"]


# ---- real Compose, when this machine has it ---------------------------------------------------------

def _compose_binary() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    binary = shutil.which("docker-compose")
    if binary:
        probe = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return [binary]
    return None


def test_docker_compose_config_accepts_the_stack(tmp_path):
    compose = _compose_binary()
    if compose is None:
        pytest.skip("no Compose v2 client on this machine (the docker CLI here has no compose plugin)")
    repo = tmp_path / "repo"
    shutil.copytree(DOCKER, repo / "docker")
    env = (REPO / ".env.example").read_text()
    for name, value in (("REDIS_PASSWORD", "pw"), ("LABEL_STUDIO_PASSWORD", "pw"),
                        ("LABEL_STUDIO_API_KEY", "0123456789abcdef")):
        env = env.replace(f"\n{name}=\n", f"\n{name}={value}\n")
    (repo / ".env").write_text(env)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run([*compose, "--profile", "dashboard", "config", "--format", "json"], cwd=repo,
                            capture_output=True, text=True, env=clean, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == set(main_stack())
    assert env_example_names()  # and the example parsed
    assert compose_variables(MAIN.read_text())

"""The scripts under docker/: container healthchecks (real HTTP server, real Redis with real RQ worker and
CronScheduler registrations), the verified SAM checkpoint download (from a local HTTP server), and
add-gpu-host.sh's checks and the command it runs."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.cron import CronScheduler

from docker_checks import DOCKER

HEALTHCHECK = DOCKER / "healthcheck.py"
FETCH = DOCKER / "fetch_sam_weights.py"


def run(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self):  # noqa: N802
        if self.path == "/private":
            expected = "Basic " + base64.b64encode(b"user:secret").decode()
            status, body = (200, b"ok") if self.headers.get("Authorization") == expected else (401, b"no")
        else:
            status, body = self.routes.get(self.path, (404, b"missing"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.routes = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Handler.routes
    server.shutdown()
    server.server_close()


# ---- healthcheck.py -------------------------------------------------------------------------------

def test_http_check(http_server):
    base, routes = http_server
    routes["/health"] = (200, b'{"status": "UP"}')
    routes["/broken"] = (500, b"boom")
    assert run(HEALTHCHECK, "http", f"{base}/health").returncode == 0
    broken = run(HEALTHCHECK, "http", f"{base}/broken")
    assert broken.returncode == 1 and "500" in broken.stderr
    assert run(HEALTHCHECK, "--timeout", "1", "http", "http://127.0.0.1:9/").returncode == 1
    assert run(HEALTHCHECK, "http", f"{base}/private").returncode == 1
    assert run(HEALTHCHECK, "http", "--accept", "401", f"{base}/private").returncode == 0
    creds = {"U": "user", "P": "secret"}
    assert run(HEALTHCHECK, "http", "--auth-env", "U:P", f"{base}/private", env=creds).returncode == 0
    wrong = run(HEALTHCHECK, "http", "--auth-env", "U:P", f"{base}/private", env={"U": "user", "P": "x"})
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_rq_worker_check(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    url = ["--redis-url", redis_server.url]
    missing = run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu0")
    assert missing.returncode == 1 and "no RQ worker registered from host 'main-gpu0'" in missing.stderr

    worker = Worker([Queue("samlight-infer", connection=connection)], connection=connection, name="w-gpu0")
    worker.hostname = "main-gpu0"
    worker.register_birth()
    assert run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu0").returncode == 0
    # another container's worker does not make this one healthy
    assert run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu1").returncode == 1
    # a heartbeat older than --max-age is stale
    old = (datetime.now(timezone.utc) - timedelta(seconds=300)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    connection.hset(worker.key, "last_heartbeat", old)
    stale = run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu0", "--max-age", "120")
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu0", "--max-age", "600").returncode == 0
    worker.register_death()
    assert run(HEALTHCHECK, "rq-worker", *url, "--hostname", "main-gpu0", "--max-age", "600").returncode == 1


def test_rq_worker_check_needs_redis():
    assert run(HEALTHCHECK, "rq-worker", env={"REDIS_URL": ""}).stderr.strip() == "unhealthy: REDIS_URL is not set"
    down = run(HEALTHCHECK, "--timeout", "1", "rq-worker", "--redis-url", "redis://127.0.0.1:9/0")
    assert down.returncode == 1 and "redis" in down.stderr


def test_rq_cron_check(redis_server):
    connection = redis.Redis.from_url(redis_server.url)
    url = ["--redis-url", redis_server.url]
    cron = CronScheduler(connection, name="samlight-cron:test")
    assert run(HEALTHCHECK, "rq-cron", *url, "--hostname", cron.hostname).returncode == 1
    cron.register_birth()
    assert run(HEALTHCHECK, "rq-cron", *url, "--hostname", cron.hostname).returncode == 0
    assert run(HEALTHCHECK, "rq-cron", *url, "--hostname", "elsewhere").returncode == 1


# ---- fetch_sam_weights.py ---------------------------------------------------------------------------

def test_checksum_file_lists_the_three_official_checkpoints():
    sys.path.insert(0, str(DOCKER))
    try:
        import fetch_sam_weights as fetch
    finally:
        sys.path.remove(str(DOCKER))
    table = fetch.read_checksums(fetch.DEFAULT_CHECKSUMS)
    assert set(table) == set(fetch.FILES.values())
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in table.values())
    assert {fetch.md5_prefix(name) for name in table} == {"4b8939", "0b3195", "01ec64"}


def test_fetch_verifies_before_it_keeps_a_file(http_server, tmp_path):
    base, routes = http_server
    payload = os.urandom(300_000)
    routes["/sam_vit_b_01ec64.pth"] = (200, payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "weights"

    # right sha256, but the md5 prefix in Meta's file name does not match this content: rejected
    bad_md5 = run(FETCH, "vit_b", "--dest", str(dest), "--base-url", base, "--sha256", good)
    assert bad_md5.returncode == 1 and "md5" in bad_md5.stderr
    assert not dest.exists() or list(dest.iterdir()) == []

    wrong = run(FETCH, "vit_b", "--dest", str(dest), "--base-url", base, "--sha256", "0" * 64)
    assert wrong.returncode == 1 and "sha256 mismatch" in wrong.stderr
    assert list(dest.iterdir()) == []  # no partial or unverified file left behind

    # a user-supplied checksum file, and content served under a name whose md5 prefix matches it
    prefix = hashlib.md5(payload).hexdigest()[:6]  # noqa: S324
    sys.path.insert(0, str(DOCKER))
    try:
        import fetch_sam_weights as fetch
    finally:
        sys.path.remove(str(DOCKER))
    target = fetch.fetch(f"{base}/sam_vit_b_01ec64.pth", dest / f"sam_vit_b_{prefix}.pth", good, prefix)
    assert target.read_bytes() == payload and sorted(p.name for p in dest.iterdir()) == [target.name]


def test_fetch_needs_a_checksum(tmp_path):
    empty = tmp_path / "sums.sha256"
    empty.write_text("# nothing\n")
    result = run(FETCH, "vit_h", "--dest", str(tmp_path), "--checksums", str(empty))
    assert result.returncode == 1 and "no sha256 for sam_vit_h_4b8939.pth" in result.stderr
    malformed = tmp_path / "bad.sha256"
    malformed.write_text("abc sam_vit_h_4b8939.pth\n")
    result = run(FETCH, "vit_h", "--dest", str(tmp_path), "--checksums", str(malformed))
    assert result.returncode == 1 and "expected '<sha256>  <file name>'" in result.stderr


def test_fetch_keeps_a_verified_file_and_refuses_a_different_one(tmp_path):
    existing = tmp_path / "sam_vit_l_0b3195.pth"
    existing.write_bytes(b"weights")
    same = run(FETCH, "vit_l", "--dest", str(tmp_path), "--sha256", hashlib.sha256(b"weights").hexdigest())
    assert same.returncode == 0 and "already present and verified" in same.stdout
    other = run(FETCH, "vit_l", "--dest", str(tmp_path))  # the official sha256 of vit_l
    assert other.returncode == 1 and "sha256 differs" in other.stderr


# ---- add-gpu-host.sh ------------------------------------------------------------------------------------

def test_add_gpu_host(tmp_path):
    repo = tmp_path / "host"
    shutil.copytree(DOCKER, repo / "docker")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/docker-args\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = [str(repo / "docker" / "add-gpu-host.sh")]

    no_env = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert no_env.returncode == 2 and "no .env" in no_env.stderr

    settings = {"COMPOSE_FILE": "docker/docker-compose.yml:docker/docker-compose.gpus.yml",
                "REDIS_URL": "redis://:pw@10.1.2.3:6379/0", "LABEL_STUDIO_URL": "http://main:8080",
                "LABEL_STUDIO_API_KEY": "0123456789abcdef", "MODEL_HOST_DIR": "/mnt/models",
                "SAMLIGHT_HOST_LABEL": "", "SAMLIGHT_CHECKPOINT": "/models/weights/sam_vit_h_4b8939.pth"}
    (repo / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    unlabeled = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert unlabeled.returncode == 2 and "set SAMLIGHT_HOST_LABEL" in unlabeled.stderr

    settings["SAMLIGHT_HOST_LABEL"] = "gpubox2"
    (repo / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    generated = (repo / "docker" / "docker-compose.remote-gpus.yml").read_text()
    assert "inference-gpu0:" in generated and "inference-gpu1:" in generated
    assert (tmp_path / "docker-args").read_text().split() == [
        "compose", "--env-file", ".env", "-f", "docker/docker-compose.workers.yml", "-f",
        "docker/docker-compose.remote-gpus.yml", "up", "-d", "--build", "--remove-orphans"]
    env_lines = (repo / ".env").read_text().splitlines()
    assert "COMPOSE_FILE=docker/docker-compose.workers.yml:docker/docker-compose.remote-gpus.yml" in env_lines


# ---- model_admin.py ---------------------------------------------------------------------------------------

def test_model_admin_import_activate_and_roll_back(redis_server, tmp_path, test_student, monkeypatch, capsys):
    """In process (the registry imports torch: one import instead of one per command)."""
    import json

    from samlight.checkpoints import save_student
    from samlight.modeling import student_config

    monkeypatch.syspath_prepend(str(DOCKER))
    import model_admin

    config = student_config("lightening_test")
    first, second = tmp_path / "incoming" / "first", tmp_path / "incoming" / "second"
    save_student(test_student, config, first, metadata={})
    save_student(test_student, config, second, metadata={"note": "second"})
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("SAMLIGHT_REDIS_PREFIX", raising=False)

    def admin(*args: str) -> tuple[int, str, str]:
        code = model_admin.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = admin("import", str(first), "--activate")
    assert code == 0, err
    v1 = out.split(" as ")[1].split()[0]
    v2 = admin("import", str(second), "--activate")[1].split(" as ")[1].split()[0]
    assert v1 != v2
    listing = json.loads(admin("list")[1])
    assert listing["active"] == v2 and {v["version"] for v in listing["versions"]} == {v1, v2}
    assert next(v for v in listing["versions"] if v["version"] == v2)["parent"] == v1

    code, out, _ = admin("activate", v1)
    assert code == 0 and f"active: {v1} (was {v2})" in out
    active = redis.Redis.from_url(redis_server.url)
    assert active.get("samlight:model:active").decode() == v1

    # a tampered version is refused, an unknown one too, and the active one stays
    weights = tmp_path / "models" / "versions" / v2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    code, _, err = admin("activate", v2)
    assert code == 2 and "sha256" in err
    assert admin("activate", "no-such-version")[0] == 2
    assert admin("import", str(tmp_path / "nothing-here"))[0] == 2
    assert active.get("samlight:model:active").decode() == v1

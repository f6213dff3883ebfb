"""Real processes for the end-to-end test: Label Studio 1.23.2 (its own virtualenv) and the backend (gunicorn).

Both run on 127.0.0.1 in their own process groups and are stopped (the whole group) afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
LABEL_STUDIO_VENV = Path(os.environ.get("SAMLIGHT_LABEL_STUDIO_VENV", REPO / ".venv-labelstudio"))
INSTALL_SCRIPT = REPO / "tests" / "e2e" / "install_labelstudio.sh"
LEGACY_TOKEN = "5a1711e0e2e0000000000000000000000000e2e0"


def install_label_studio() -> None:
    """Idempotent: installs Label Studio and its migrated template database when missing."""
    subprocess.run(["bash", str(INSTALL_SCRIPT), str(LABEL_STUDIO_VENV)], cwd=REPO, check=True)


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float, headers=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop_group(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class LabelStudio:
    """``label-studio start`` on 127.0.0.1 with a temporary data dir copied from the migrated template."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = Path(directory)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.log = self.directory / "label-studio.log"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {LEGACY_TOKEN}"

    def start(self, timeout: float = 150) -> "LabelStudio":
        data = self.directory / "data"
        template = LABEL_STUDIO_VENV / "template-data"
        if template.is_dir():
            shutil.copytree(template, data)
        env = {
            **os.environ,
            "HOME": str(self.directory),
            "LABEL_STUDIO_BASE_DATA_DIR": str(data),
            # the backend runs on loopback: allow it, and let Label Studio create its webhook
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        }
        command = [str(LABEL_STUDIO_VENV / "bin" / "label-studio"), "start", "--no-browser",
                   "--internal-host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data),
                   "--username", "e2e@example.com", "--password", "e2e-password-123",
                   "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.directory, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/api/projects", self.process, self.log, timeout,
                   headers=dict(self.session.headers))
        return self

    def stop(self) -> None:
        _stop_group(self.process)

    def api(self, method: str, path: str, expect: int | tuple = (200, 201), **kwargs) -> requests.Response:
        response = self.session.request(method, f"{self.url}{path}", timeout=120, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        if response.status_code not in expected:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text[:1000]}")
        return response


class Backend:
    """``python -m backend.serve`` (gunicorn with backend/gunicorn_conf.py) as a subprocess."""

    def __init__(self, directory: Path, port: int, env: dict[str, str], args: list[str]) -> None:
        self.directory = Path(directory)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.args = args
        self.model_dir = self.directory / "models"
        self.log = self.directory / "backend.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Backend":
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MODEL_DIR": str(self.model_dir), "SAMLIGHT_HOST": "127.0.0.1",
               "PORT": str(self.port), **self.env}
        for name in ("REDIS_URL", "SAMLIGHT_CHECKPOINT", "SAMLIGHT_RANDOM", "SAMLIGHT_TEST_MODEL"):
            if name not in self.env:
                env.pop(name, None)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "backend.serve", *self.args], cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/health", self.process, self.log, timeout)
        return self

    def stop(self) -> None:
        _stop_group(self.process)

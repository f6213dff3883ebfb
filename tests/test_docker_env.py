""".env.example documents every variable: the ones the code reads (scanned from backend/, serving/,
workers/, samlight/ and docker/*.py as they are) and the ones the compose files interpolate."""

from __future__ import annotations

import ast
from docker_checks import DOCKER, REPO, code_env_reads, compose_variables, env_example_names, env_reads

COMPOSE_FILES = sorted(DOCKER.glob("docker-compose*.yml")) + sorted(DOCKER.glob("services*.yml"))
# read by the scripts under docker/ (they run in the images and on hosts)
SCRIPT_DIRS = ("docker",)


def test_scanner_finds_every_way_the_code_reads_the_environment(tmp_path):
    source = '''
import os
from os import environ, getenv
a = os.environ.get("A_GET", "x")
b = os.environ["B_ITEM"]
c = os.getenv("C_GETENV")
d = getenv("D_BARE_GETENV")
e = environ.get("E_ENVIRON")
def f(env=None):
    env = os.environ if env is None else env
    return env.get("F_ENV_PARAM"), env["G_ENV_ITEM"]
h = _env_int("H_HELPER", 3)
i = "I_IN" in os.environ
read = Environment(env)
j = read.integer("J_READER", 3), Environment().flag("K_READER", False)
os.environ["NOT_A_READ"] = "1"
help_text = "NOT_EITHER"
'''
    found = {r.name for r in env_reads(ast.parse(source), tmp_path / "x.py")}
    assert found == {"A_GET", "B_ITEM", "C_GETENV", "D_BARE_GETENV", "E_ENVIRON", "F_ENV_PARAM", "G_ENV_ITEM",
                     "H_HELPER", "I_IN", "J_READER", "K_READER"}


def test_every_variable_the_code_reads_is_in_env_example():
    reads = code_env_reads() + code_env_reads(SCRIPT_DIRS)
    assert len({r.name for r in reads}) >= 10, "the scan found too little: is the code where it should be?"
    documented = env_example_names()
    missing = sorted({f"{r.name} ({r.where()})" for r in reads if r.name not in documented})
    assert missing == [], "add these to .env.example:\n" + "\n".join(missing)


def test_every_compose_variable_is_in_env_example():
    documented = env_example_names()
    missing = {}
    for path in COMPOSE_FILES:
        for name in compose_variables(path.read_text()):
            if name not in documented:
                missing.setdefault(name, path.name)
    assert missing == {}, "add these to .env.example"


def test_required_compose_variables_are_present_uncommented():
    """`${X:?}` variables stop compose when empty: the example lists them as NAME= lines to fill in
    (secrets) or with a value, never only as a comment. Extra-host-only ones are exempt."""
    text = (REPO / ".env.example").read_text()
    set_lines = {line.split("=", 1)[0] for line in text.splitlines() if line[:1].isalpha() and "=" in line}
    extra_host_only = {"MODEL_HOST_DIR", "SAMLIGHT_HOST_LABEL"}  # docker/add-gpu-host.sh demands them
    required = set()
    for path in COMPOSE_FILES:
        required |= {n for n, (op, _) in compose_variables(path.read_text()).items() if op == ":?"}
    assert {"REDIS_PASSWORD", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD"} <= required
    assert sorted(required - extra_host_only - set_lines) == []


def test_secrets_ship_empty():
    values = env_example_names()
    for name in ("REDIS_PASSWORD", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS",
                 "RQ_DASHBOARD_PASSWORD"):
        assert values[name] == "", f"{name} must be empty in the example (compose refuses empty required ones)"


def test_the_stack_can_start_with_the_example_defaults():
    """Settings the services need to start at all (the cron exits when nothing is scheduled; the
    inference worker needs a model) have working values in the example."""
    values = env_example_names()
    assert float(values["SAMLIGHT_TRAIN_EVERY_HOURS"]) > 0 or int(values["SAMLIGHT_TRAIN_AFTER_CORRECTIONS"]) > 0
    assert values["SAMLIGHT_CHECKPOINT"].startswith("/models/")
    assert values["SAMLIGHT_TEACHER"].split(":", 1)[1].startswith("/models/")
    compose_file = values["COMPOSE_FILE"].split(":")
    assert all((REPO / f).is_file() for f in compose_file), compose_file


def test_env_example_sets_each_variable_once():
    names = [line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
             if line[:1].isalpha() and "=" in line]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)

"""The fault and fuzz suite (``bench/faults.py --quick``) as CI runs it: both serving modes, real processes.

Token-leak URLs, malformed bodies and prompt limits, a trickling image server, Redis restarted, stopped,
frozen and out of memory under clicks and webhooks, and an inference worker killed with -9: no token may
reach another host, no request may get a 5xx where a 4xx or a mask is due, clicks must work again after each
fault, and no acknowledged webhook may be lost.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import COCO_TINY, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_fault_suite_quick(tmp_path):
    out = tmp_path / "faults.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--quick", "--images",
                          str(COCO_TINY / "val2017"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=840)
    print(run.stdout[-4000:], run.stderr[-4000:])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["scenario"]) for r in rows if r["tried"]} >= {
        ("rq", "token leak URLs"), ("rq", "Redis out of memory 3 s"), ("rq", "worker kill -9 + restart"),
        ("embedded", "fuzz bodies and limits"), ("embedded", "trickling image server")}
    bad = [r for r in rows if r["failed"] or r["lost"]]
    assert bad == [] and run.returncode == 0, bad

"""What the multi-step GPU benches share: a results JSON rewritten after every step (a run cut short by the device's
time limit still reports what it did), logged subprocesses, and phases that run on when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


class PhasedRun:
    def __init__(self, results_path: Path, results: dict) -> None:
        self.results_path = results_path
        self.results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}, **results}
        self.save()

    def save(self) -> None:
        temp = self.results_path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.results, indent=2, sort_keys=True, default=str))
        os.replace(temp, self.results_path)

    def call(self, name: str, command: list[str], **popen) -> None:
        """Run ``command``, print its output's tail (without progress-bar lines), record its time; raise on failure."""
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        self.results["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), "rc": done.returncode}
        self.save()
        tail = "\n".join(line for line in done.stdout.splitlines() if "it/s]" not in line and "step/s]" not in line)
        print(tail[-4000:], flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed with rc {done.returncode}")

    def run_phases(self, phases: str) -> int:
        """Call ``self.phase_<name>()`` for each comma-separated name; a failed phase is recorded and the next one
        runs (they need not depend on each other). Returns the exit status: 1 if any failed."""
        failed = []
        for phase in [p.strip() for p in phases.split(",") if p.strip()]:
            started = time.perf_counter()
            try:
                getattr(self, f"phase_{phase}")()
            except Exception as error:  # noqa: BLE001 - reported in the results, the other phases still run
                failed.append(phase)
                self.results.setdefault("errors", {})[phase] = repr(error)
                print(f"phase {phase} failed: {error!r}", flush=True)
            self.results.setdefault("phase_seconds", {})[phase] = round(time.perf_counter() - started, 1)
            self.save()
        self.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        return 1 if failed else 0

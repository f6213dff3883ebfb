"""Small state shared by the processes of one deployment through files: JSON documents written atomically,
and whether a process recorded in one is still alive."""

from __future__ import annotations

import json
import os
from pathlib import Path


def parse_json_object(text: str) -> dict:
    """A JSON object, or ``{}`` for empty, torn or foreign content."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_json(path: Path) -> dict:
    try:
        return parse_json_object(Path(path).read_text())
    except FileNotFoundError:
        return {}


def write_json(path: Path, data: dict) -> None:
    """Whole documents only: a reader never sees half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True

"""Small state shared by the processes of one deployment through files: documents written atomically,
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
    write_text_atomically(path, json.dumps(data, indent=1))


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` as the whole content of ``path``, durably: a temporary file, fsynced, renamed over ``path``, its
    folder fsynced. A reader, or a crash at any point, finds the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True

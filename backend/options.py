"""Per-project options: Label Studio's "Extra params" of the connected model, parsed in one place.

Label Studio sends them only on ``/setup`` (as ``extra_params``). Its Connect Model form stores the text box
verbatim, so they arrive as a *string* (``""``, ``"{}"`` or JSON text); the API may store an object. Every
``/predict`` names its project (``"<id>.<created timestamp>"``), so the options are kept per project in
``ProjectOptionsStore`` (a small JSON file per project under ``MODEL_DIR/projects``: every gunicorn process and
a restarted backend see them) and looked up for each prediction.

| key | type | default | meaning |
|---|---|---|---|
| ``prewarm`` | bool | true | compute a task's image embedding when Label Studio opens it (first click is fast) |
| ``min_score`` | number in [0, 1] | 0 | a mask whose predicted quality is below this is not suggested (empty answer) |
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from serving.errors import StatusError

log = logging.getLogger(__name__)

_PROJECT_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


class OptionsError(StatusError):
    """``extra_params`` that cannot be used (400); the message names the field and what is wrong."""


@dataclass(frozen=True)
class ProjectOptions:
    prewarm: bool = True
    min_score: float = 0.0

    @classmethod
    def parse(cls, extra_params: Any) -> "ProjectOptions":
        """Options from ``extra_params`` as Label Studio sends it: an object, null, or JSON text."""
        if extra_params is None:
            return cls()
        if isinstance(extra_params, str):
            text = extra_params.strip()
            if not text:
                return cls()
            try:
                extra_params = json.loads(text)
            except json.JSONDecodeError as error:
                raise OptionsError(f"'extra_params' is not valid JSON: {error.msg} at line {error.lineno} "
                                   f"column {error.colno} (got {_excerpt(text)})") from None
            if extra_params is None:
                return cls()
        if not isinstance(extra_params, dict):
            raise OptionsError(f"'extra_params' must be a JSON object, got {type(extra_params).__name__} "
                               f"({_excerpt(json.dumps(extra_params))})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra_params) - known)
        if unknown:
            raise OptionsError(f"'extra_params' has unknown option(s) {unknown}; known: {sorted(known)}")
        values = {}
        if "prewarm" in extra_params:
            values["prewarm"] = _boolean(extra_params["prewarm"], "prewarm")
        if "min_score" in extra_params:
            values["min_score"] = _fraction(extra_params["min_score"], "min_score")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(f"'extra_params.{name}' must be true or false, got {value!r}")
    return value


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise OptionsError(f"'extra_params.{name}' must be a number from 0 to 1, got {value!r}")
    return float(value)


def project_key(value: Any) -> str | None:
    """Label Studio's project uid (``"12.1733100000"``, or a bare id) as a safe file name; None if unusable."""
    if isinstance(value, bool) or value is None:
        return None
    key = str(value)
    return key if _PROJECT_KEY.match(key) else None


class ProjectOptionsStore:
    """Options by project, written atomically to ``directory/<project>.json``; shared by processes."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def save(self, project: str, options: ProjectOptions) -> None:
        """Store the options; a no-op when they are unchanged (Label Studio calls /setup at every task open)."""
        if (self.directory / f"{project}.json").exists() and self.get(project) == options:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{project}.json"
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".options-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(options.to_dict(), f)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, project: str | None) -> ProjectOptions:
        """The project's stored options, or the defaults (unknown project, or a file from an older version)."""
        if project is None:
            return ProjectOptions()
        path = self.directory / f"{project}.json"
        try:
            return ProjectOptions.parse(json.loads(path.read_text()))
        except FileNotFoundError:
            return ProjectOptions()
        except (OSError, ValueError) as error:  # OptionsError is a ValueError
            log.warning("ignoring the stored options of project %s: %s", project, error)
            return ProjectOptions()

"""Per-project options: Label Studio's "Extra params" of the connected model, over the deployment's defaults.

Label Studio sends them only on ``/setup`` (as ``extra_params``). Its Connect Model form stores the text box
verbatim, so they arrive as a *string* (``""``, ``"{}"`` or JSON text); the API may store an object. Every
``/predict`` names its project (``"<id>.<created timestamp>"``), so the options a project sets are kept per
project in ``ProjectOptionsStore`` (a small JSON file per project under ``MODEL_DIR/projects``: every gunicorn
process and a restarted backend see them) and laid over the deployment's defaults (``SAMLIGHT_<KEY>``
environment variables, read by ``serving.config``) for each prediction.

| key | type | default | meaning |
|---|---|---|---|
| ``prewarm`` | bool | true | compute a task's image embedding when Label Studio opens it (first click is fast) |
| ``min_score`` | number in [0, 1] | 0 | a mask whose predicted quality is below this is not suggested |
| ``outputs`` | list of names | all | which targets get masks: kinds (``brush``, ``polygon``, ``box``) or control names |
| ``min_area`` | integer >= 0 | 100 | clean-up: islands smaller than this many pixels are removed, holes filled; polygon
  parts smaller are dropped; 0 turns clean-up off |
| ``largest_only`` | bool | false | keep only the largest connected part of each mask (one polygon) |
| ``polygon_tolerance`` | number in [0, 100] | 1.0 | pixels a simplified polygon may stray from the mask |
| ``refine`` | bool | true | a click that adds to an object's prompts refines its previous mask (SAM's mask input) |
| ``auto_annotate`` | bool | false | batch predictions (a task opened, "Retrieve Predictions") get automatic masks |
| ``auto_label`` | label name | first | the automatic masks' label (each target's first label when none has it) |
| ``auto_points_per_side`` | integer 1-128 | 32 | the automatic masks' grid of point prompts per side |
| ``auto_pred_iou``, ``auto_stability`` | number in [0, 1] | 0.88, 0.95 | automatic masks' quality thresholds |
| ``auto_box_nms`` | number in [0, 1] | 0.7 | of two automatic masks whose boxes overlap more (IoU), the weaker goes |
| ``auto_crop_layers`` | integer 0-3 | 0 | small objects: also grid overlapping crops (layer i: (2^i)² crops) |
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from serving.errors import StatusError

log = logging.getLogger(__name__)

_PROJECT_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


class OptionsError(StatusError):
    """``extra_params`` that cannot be used (400); the message names the field and what is wrong."""


@dataclass(frozen=True)
class ProjectOptions:
    prewarm: bool = True
    min_score: float = 0.0
    outputs: tuple[str, ...] = ()  # empty: every target of the labeling config
    min_area: int = 100
    largest_only: bool = False
    polygon_tolerance: float = 1.0
    refine: bool = True
    auto_annotate: bool = False
    auto_label: str | None = None
    auto_points_per_side: int = 32
    auto_pred_iou: float = 0.88
    auto_stability: float = 0.95
    auto_box_nms: float = 0.7
    auto_crop_layers: int = 0

    def updated(self, values: Mapping[str, Any],
                name: Callable[[str], str] = lambda key: f"'extra_params.{key}'") -> "ProjectOptions":
        """These options with ``values`` laid over them, each checked; errors name the value by ``name(key)``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(name(k) for k in unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **{key: _CHECKS[key](value, name(key)) for key, value in values.items()})

    @classmethod
    def parse(cls, extra_params: Any, base: "ProjectOptions | None" = None) -> "ProjectOptions":
        """``base`` (default: the built-in defaults) with ``extra_params`` as Label Studio sends it laid over."""
        return (base or cls()).updated(given_options(extra_params))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outputs": list(self.outputs)}


def given_options(extra_params: Any) -> dict[str, Any]:
    """The options object in ``extra_params`` (an object, null, or JSON text), checked."""
    if extra_params is None:
        return {}
    if isinstance(extra_params, str):
        text = extra_params.strip()
        if not text:
            return {}
        try:
            extra_params = json.loads(text)
        except json.JSONDecodeError as error:
            raise OptionsError(f"'extra_params' is not valid JSON: {error.msg} at line {error.lineno} "
                               f"column {error.colno} (got {_excerpt(text)})") from None
        if extra_params is None:
            return {}
    if not isinstance(extra_params, dict):
        raise OptionsError(f"'extra_params' must be a JSON object, got {type(extra_params).__name__} "
                           f"({_excerpt(json.dumps(extra_params))})")
    ProjectOptions().updated(extra_params)  # raises on a bad one
    return extra_params


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionsError(f"{name} must be true or false, got {value!r}")
    return value


def _number(low: float, high: float, integer: bool = False):
    def check(value: Any, name: str):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (integer and value != int(value)):
            kind = "an integer" if integer else "a number"
            raise OptionsError(f"{name} must be {kind} from {low:,} to {high:,}, got {value!r}")
        return int(value) if integer else float(value)
    return check


def _label(value: Any, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise OptionsError(f"{name} must be a label name (text), got {value!r}")
    return value


def _names(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise OptionsError(f"{name} must be a list of output kinds (brush, polygon, box) or control names, "
                           f"got {value!r}")
    return tuple(value)


_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "prewarm": _boolean,
    "min_score": _number(0, 1),
    "outputs": _names,
    "min_area": _number(0, 10_000_000, integer=True),
    "largest_only": _boolean,
    "polygon_tolerance": _number(0, 100),
    "refine": _boolean,
    "auto_annotate": _boolean,
    "auto_label": _label,
    "auto_points_per_side": _number(1, 128, integer=True),
    "auto_pred_iou": _number(0, 1),
    "auto_stability": _number(0, 1),
    "auto_box_nms": _number(0, 1),
    "auto_crop_layers": _number(0, 3, integer=True),
}


def project_key(value: Any) -> str | None:
    """Label Studio's project uid (``"12.1733100000"``, or a bare id) as a safe file name; None if unusable."""
    if isinstance(value, bool) or value is None:
        return None
    key = str(value)
    return key if _PROJECT_KEY.match(key) else None


class ProjectOptionsStore:
    """The options each project set (only those it set), written atomically to ``directory/<project>.json``;
    shared by processes. ``get`` lays them over the deployment's defaults, so a changed default reaches every
    project that did not set that option."""

    def __init__(self, directory: str | os.PathLike, defaults: ProjectOptions | None = None) -> None:
        self.directory = Path(directory)
        self.defaults = defaults or ProjectOptions()

    def save(self, project: str, extra_params: Any) -> ProjectOptions:
        """Check and store a project's ``extra_params``; a no-op when they are unchanged (Label Studio calls
        /setup at every task open). Returns the project's options."""
        given = given_options(extra_params)
        path = self.directory / f"{project}.json"
        if not (path.exists() and self._given(project) == given):
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".options-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(given, f)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        return self.defaults.updated(given)

    def get(self, project: str | None) -> ProjectOptions:
        """The project's options: the defaults with what it set laid over them."""
        try:
            return self.defaults.updated(self._given(project))
        except OptionsError as error:  # a file from another version
            log.warning("ignoring the stored options of project %s: %s", project, error)
            return self.defaults

    def _given(self, project: str | None) -> dict:
        if project is None:
            return {}
        try:
            given = json.loads((self.directory / f"{project}.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("ignoring the stored options of project %s: %s", project, error)
            return {}
        return given if isinstance(given, dict) else {}

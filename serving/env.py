"""Reading environment variables the same way everywhere in the backend."""

from __future__ import annotations


def flag(value: str | None, default: bool) -> bool:
    """An on/off variable: 1/true/yes/on (any case) is on; unset or empty gives ``default``."""
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")

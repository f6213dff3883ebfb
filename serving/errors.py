"""The one error shape the backend answers with: a message and the HTTP status it maps to."""

from __future__ import annotations


class StatusError(ValueError):
    """A failure the caller caused or can act on; ``status`` is the HTTP status of the answer."""

    default_status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = self.default_status if status is None else status

"""Refusals as HTTP answers: API.md's error body with its status.

A refusal found in the HTTP process is raised as `ApiError`; one found in the worker arrives as an
`error` event, whose `type` gives the status (`ERROR_STATUS`).
"""

from __future__ import annotations

from model.limits import RequestRefused

ERROR_STATUS = {"context_length_exceeded": 400, "invalid_request": 400, "attention_payload_too_large": 400,
                "overloaded": 429, "cancelled": 499, "timeout": 504, "internal_error": 500}
# Every error type the server counts (attnserve_request_errors_total{type}): the above, and the
# refusals made before a request is built.
ERROR_TYPES = (*ERROR_STATUS, "validation", "unauthorized", "payload_too_large")


class ApiError(Exception):
    """A refusal with an HTTP status and API.md's error body."""

    def __init__(self, status: int, error_type: str, message: str, *, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"type": error_type, "message": message, **extra}}

    @classmethod
    def refused(cls, exc: RequestRefused) -> ApiError:
        """The model's refusal of a request (model.limits) as its 400."""
        return cls(ERROR_STATUS[exc.error_type], exc.error_type, str(exc), **exc.details)

"""The client's exceptions, and the mapping from an HTTP error response to one of them.

    AttnserveError
    ├── APIConnectionError          the server could not be reached (after the retries)
    │   └── APITimeoutError         connect or read timeout
    └── APIError                    the server answered with an error: .status .type .message .body
        ├── BadRequestError         400 / 413 / 422 (422 is FastAPI's schema check: type "validation_error")
        │   └── ContextLengthExceededError   the prompt does not fit: .prompt_tokens .max_context
        ├── AuthenticationError     401 / 403
        ├── NotFoundError           404
        ├── RateLimitError          429 (after the retries): .retry_after
        ├── ServerError             5xx (503 after the retries)
        └── StreamError             an error event after the stream started, or a stream cut off

Input the client can check itself never reaches the server: it raises pydantic's `ValidationError`
(a `ValueError`), re-exported as `clients.ValidationError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import urllib3
from pydantic import ValidationError
from urllib3.exceptions import InvalidHeader

from server.schemas import ErrorInfo

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AttnserveError", "AuthenticationError",
    "BadRequestError", "ContextLengthExceededError", "NotFoundError", "RateLimitError", "ServerError",
    "StreamError", "ValidationError", "error_from_response", "parse_retry_after",
]


class AttnserveError(Exception):
    """Everything the client raises about the server (not client-side validation)."""


class APIConnectionError(AttnserveError):
    """No response: connection refused or dropped before a status line (after the retries)."""


class APITimeoutError(APIConnectionError):
    """The connect or read timeout ran out."""


class APIError(AttnserveError):
    """The server answered with an error.

    `type` and `message` are the server's (`{"error": {"type", "message", ...}}`); `body` is the parsed
    JSON body (or its text); `info` is the error object with its extra fields (e.g. `param`).
    """

    def __init__(self, status: int, type: str, message: str, body: Any = None, *,
                 headers: Mapping[str, str] | None = None, info: ErrorInfo | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.body = status, type, message, body
        self.headers = dict(headers or {})
        self.info = info or ErrorInfo(type=type, message=message)


class BadRequestError(APIError):
    """The server refused the request's content (400, 413, 422)."""


class ContextLengthExceededError(BadRequestError):
    """The prompt has more tokens than the server's context holds."""

    @property
    def prompt_tokens(self) -> int | None:
        return self.info.prompt_tokens

    @property
    def max_context(self) -> int | None:
        return self.info.max_context


class AuthenticationError(APIError):
    """A missing or wrong API key (pass `api_key=` or set ATTNSERVE_API_KEY)."""


class NotFoundError(APIError):
    """No such route: is the base URL right?"""


class RateLimitError(APIError):
    """The server is at capacity (429) and still was after the retries."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class ServerError(APIError):
    """A 5xx: the server failed, timed out, or was unavailable after the retries."""


class StreamError(APIError):
    """The stream had started (status 200) when it failed: an error event, or it was cut off
    (type "incomplete_stream"). Never retried: tokens may already have been handed out."""


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: whole seconds or an HTTP date (RFC 9110, read by urllib3; a date in
    the past is 0); None if absent or unreadable."""
    if value is None:
        return None
    try:
        return float(_RETRY_AFTER.parse_retry_after(value))
    except InvalidHeader:
        return None


_RETRY_AFTER = urllib3.util.Retry()


def _class_for(status: int, error_type: str) -> type[APIError]:
    if error_type == "context_length_exceeded":
        return ContextLengthExceededError
    if status in (400, 413, 422):
        return BadRequestError
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ServerError
    return APIError


def _detail_message(detail: Any) -> str:
    """FastAPI's 422 `detail` list as one line: `sampling.top_p.p: Input should be ...; ...`."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if isinstance(item, dict):
            loc = [str(p) for p in item.get("loc", []) if p != "body"]
            parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', item)}")
        else:
            parts.append(str(item))
    return "; ".join(parts)


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> APIError:
    """The exception for an error response: the server's error type and message when the body is
    API.md's `{"error": {...}}`, FastAPI's `{"detail": ...}` as type "validation_error", else the text."""
    headers = {k.lower(): v for k, v in headers.items()}
    text = content.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    info = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        try:
            info = ErrorInfo.model_validate(body["error"])
        except ValidationError:
            info = None
    if info is not None:
        error_type, message = info.type, info.message
    elif isinstance(body, dict) and "detail" in body:
        error_type = "validation_error" if status == 422 else "http_error"
        message = _detail_message(body["detail"])
    else:
        error_type, message = "http_error", text.strip()[:500] or f"HTTP {status}"
    return _class_for(status, error_type)(status, error_type, message, body, headers=headers, info=info)


def stream_error(info: ErrorInfo, body: Any = None) -> StreamError:
    return StreamError(200, info.type, info.message, body, info=info)

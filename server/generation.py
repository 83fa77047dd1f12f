"""The HTTP side of one generation: admission, hand-off to a worker, the event stream back.

Runs in each uvicorn process. `Dispatcher.open` sends the internal request to LitServe's worker
queue and waits for the first event, so a refusal (queue full, context too long) still gets its
real status code before any byte of the stream; after that, events are streamed as they come.
Leaving early (client disconnect, caller stops iterating, server time limit) cancels the request
in the worker through the cancel queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from litserve.server import StreamingRequestHandler

from server import native
from server.metrics import Metrics
from server.worker import WORKER_PID

LIVENESS_CHECK_SECONDS = 1.0   # how often a waiting stream checks that its worker process is alive

ERROR_STATUS = {"context_length_exceeded": 400, "invalid_request": 400, "attention_payload_too_large": 400,
                "overloaded": 429, "cancelled": 499, "timeout": 504, "internal_error": 500}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ApiError(Exception):
    """A refusal with an HTTP status and API.md's error body."""

    def __init__(self, status: int, error_type: str, message: str, *, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"type": error_type, "message": message, **extra}}


class Admission:
    """Bounds requests in flight across every HTTP process (a shared counter made before the fork)."""

    def __init__(self, counter, capacity: int):
        self.counter, self.capacity = counter, capacity

    def enter(self) -> None:
        with self.counter.get_lock():
            if self.counter.value >= self.capacity:
                raise ApiError(429, "overloaded", f"the server is at capacity ({self.capacity} requests in flight);"
                               " retry shortly", headers={"Retry-After": "1"})
            self.counter.value += 1

    def leave(self) -> None:
        with self.counter.get_lock():
            self.counter.value -= 1


class Dispatcher:
    def __init__(self, server, lit_api, *, admission: Admission, cancel_writers: list, metrics: Metrics,
                 max_request_seconds: float):
        self._handler = StreamingRequestHandler(lit_api, server)
        self.admission, self.cancel_writers, self.metrics = admission, cancel_writers, metrics
        for writer in cancel_writers:
            os.set_blocking(writer.fileno(), False)   # a stuck worker must never block the event loop
        self.max_request_seconds = max_request_seconds

    async def open(self, payload: dict) -> EventStream:
        """Admit, submit and wait for the first event; raise ApiError if the worker refused."""
        self.admission.enter()
        arrived = time.perf_counter()
        payload["request_id"] = request_id = uuid.uuid4().hex
        stream = EventStream(self, request_id, arrived)
        try:
            response = await self._handler.handle_request(payload, dict)
            stream.attach(response.body_iterator)
            first = await stream.first()
        except BaseException:
            await stream.aclose()
            raise
        if first["type"] == "error":
            await stream.aclose()
            error = first["error"]
            status = ERROR_STATUS.get(error["type"], 500)
            raise ApiError(status, error.pop("type"), error.pop("message"),
                           headers={"Retry-After": "1"} if status == 429 else None, **error)
        return stream

    def cancel(self, request_id: str) -> None:
        for writer in self.cancel_writers:     # only the owning worker knows the id; all are told
            # < PIPE_BUF: one atomic write. A full or broken pipe: that worker is stuck or gone.
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                writer.send_bytes(request_id.encode())


class EventStream:
    """Native event dicts of one request, in order; always ends with a done or error event."""

    def __init__(self, dispatcher: Dispatcher, request_id: str, arrived: float):
        self.dispatcher, self.request_id, self.arrived = dispatcher, request_id, arrived
        self.deadline = arrived + dispatcher.max_request_seconds
        self._chunks: AsyncIterator | None = None
        self._first: dict | None = None
        self._ended = self._closed = False
        self._pending: deque[dict] = deque()   # events that arrived together in one message
        self._worker_pid: int | None = None
        self._seen_token = False

    def attach(self, chunks: AsyncIterator) -> None:
        self._chunks = chunks

    async def first(self) -> dict:
        self._first = await self._next()
        return self._first

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            while not self._ended:
                event = await self._next()
                if event["type"] == "error":   # (an error first event is not here: it became open's ApiError)
                    self.dispatcher.metrics.error(event["error"]["type"])
                yield event
        finally:
            await self.aclose()

    async def _next(self) -> dict:
        if not self._pending:
            self._pending.extend(await self._receive())
        event = self._pending.popleft()
        kind = event["type"]
        if kind == "start":
            self._worker_pid = event.pop(WORKER_PID, None)
        if kind == "token" and not self._seen_token:
            self._seen_token = True
            self.dispatcher.metrics.ttft.observe(time.perf_counter() - self.arrived)
        if kind in ("done", "error"):
            self._ended = True
        return event

    async def _receive(self) -> list[dict]:
        """The next message's events, or an error event if the worker died or time ran out."""
        next_chunk = asyncio.ensure_future(anext(self._chunks))
        try:
            while True:
                remaining = self.deadline - time.perf_counter()
                if remaining <= 0:
                    return [native.error_event("timeout", "the request ran past the server's limit of "
                                               f"{self.dispatcher.max_request_seconds:g} s")]
                done, _ = await asyncio.wait({next_chunk}, timeout=min(remaining, LIVENESS_CHECK_SECONDS))
                if done:
                    break
                if self._worker_pid is not None and not _alive(self._worker_pid):
                    # LitServe restarts a dead worker but never ends the streams it was serving.
                    return [native.error_event("internal_error", "the inference worker died; "
                                               "the server is restarting it, retry shortly")]
            chunk = next_chunk.result()
        except StopAsyncIteration:   # the stream ended without a last event: LitServe's silent error
            return [native.error_event("internal_error", "the inference worker stopped before finishing")]
        finally:
            if not next_chunk.done():
                next_chunk.cancel()
                await asyncio.wait({next_chunk})   # let the generator settle before it is closed
        return [json.loads(line) for line in chunk.splitlines() if line]

    async def aclose(self) -> None:
        """Release everything; cancel the request in the worker if it is still running."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self.dispatcher.cancel(self.request_id)
        self.dispatcher.metrics.e2e.observe(time.perf_counter() - self.arrived)
        self.dispatcher.admission.leave()
        if self._chunks is not None:
            await self._chunks.aclose()

"""The HTTP side of one generation: admission, hand-off to a worker, the event stream back.

Runs in each uvicorn process. `Dispatcher.open` sends the internal request to LitServe's worker
queue and waits for the first event, so a refusal (queue full, context too long) still gets its
real status code before any byte of the stream; after that, events are streamed as they come.
Leaving early (client disconnect, caller stops iterating, server time limit) cancels the request
in the worker through the cancel queues.

The worker's messages are read straight from LitServe's response buffer (the entry its own
streaming handler would make) rather than through that handler's three nested generators. A
token event's NDJSON line goes out as the worker wrote it: per token, this process does a deque
pop and a prefix check, and parses JSON only for the other events; what arrived in one message
goes out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import deque

from litserve.server import StreamingRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem

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
            uid, _ = await self._handler._submit_request(payload)
            # Registered before this task next yields, so before any of the worker's messages is read.
            buffer = self._handler.server.response_buffer
            buffer[uid] = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
            stream.attach(buffer, uid)
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
    """The events of one request, in order; always ends with a done or error event. Iterate it for
    event dicts, or `messages()` for them as they arrived together."""

    def __init__(self, dispatcher: Dispatcher, request_id: str, arrived: float):
        self.dispatcher, self.request_id, self.arrived = dispatcher, request_id, arrived
        self.deadline = arrived + dispatcher.max_request_seconds
        self._buffer: dict | None = None
        self._uid: str | None = None
        self._first: tuple[str, dict] | None = None
        self._ended = self._closed = False
        self._pending: deque[str] = deque()    # lines that arrived together in one message
        self._worker_pid: int | None = None
        self._seen_token = False

    def attach(self, buffer: dict, uid: str) -> None:
        self._buffer, self._uid = buffer, uid

    async def first(self) -> dict:
        line, event = await self._next()
        self._first = line, event
        return event

    async def __aiter__(self):
        async for message in self.messages():
            for event in message:
                yield event

    async def messages(self, *, parsed: bool = True):
        """The events a message at a time (those the worker sent together): as dicts, or with
        parsed=False as NDJSON lines (without newlines), token lines passed through unparsed."""
        try:
            first, self._first = self._first, None
            while first is not None or not self._ended:
                message = [first or await self._next()]
                first = None
                while self._pending:
                    message.append(self._pop())
                for _, event in message:
                    if event is not None and event["type"] == "error":   # (never the first: open raised it)
                        self.dispatcher.metrics.error(event["error"]["type"])
                if parsed:
                    yield [event if event is not None else json.loads(line) for line, event in message]
                else:
                    yield [line for line, _ in message]
        finally:
            await self.aclose()

    async def _next(self) -> tuple[str, dict | None]:
        """The next event's line, and the event parsed unless it is a token."""
        if not self._pending:
            self._pending.extend(await self._receive())
        return self._pop()

    def _pop(self) -> tuple[str, dict | None]:
        """`_next` for a line already received."""
        line = self._pending.popleft()
        if line.startswith(native.TOKEN_LINE):
            if not self._seen_token:
                self._seen_token = True
                self.dispatcher.metrics.ttft.observe(time.perf_counter() - self.arrived)
            return line, None
        event = json.loads(line)
        kind = event["type"]
        if kind == "start" and WORKER_PID in event:
            self._worker_pid = event.pop(WORKER_PID)
            line = native.line(event)
        if kind in ("done", "error"):
            self._ended = True
        return line, event

    async def _receive(self) -> list[str]:
        """The next message's lines, or an error event's if the worker died or time ran out."""
        item = self._buffer[self._uid]
        while True:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                return [native.error_line("timeout", "the request ran past the server's limit of "
                                          f"{self.dispatcher.max_request_seconds:g} s")]
            if item.response_queue:
                break
            item.event.clear()
            try:
                async with asyncio.timeout(min(remaining, LIVENESS_CHECK_SECONDS)):
                    await item.event.wait()
            except TimeoutError:
                if self._worker_pid is not None and not _alive(self._worker_pid):
                    # LitServe restarts a dead worker but never ends the streams it was serving.
                    return [native.error_line("internal_error", "the inference worker died; "
                                              "the server is restarting it, retry shortly")]
        data, status = item.response_queue.popleft()
        if status != LitAPIStatus.OK:  # finished or failed without a last event: LitServe's silent error
            return [native.error_line("internal_error", "the inference worker stopped before finishing")]
        return data.splitlines()

    async def aclose(self) -> None:
        """Release everything; cancel the request in the worker if it is still running."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self.dispatcher.cancel(self.request_id)
        self.dispatcher.metrics.e2e.observe(time.perf_counter() - self.arrived)
        self.dispatcher.admission.leave()
        if self._buffer is not None:
            self._buffer.pop(self._uid, None)

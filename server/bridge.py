"""The one crossing between the HTTP processes and the inference workers — and the only module that
knows LitServe's internals (written against litserve 0.2.19, pinned in pyproject.toml).

    HTTP process                                   worker process
    Bridge.open(request, model) ── model, request ▶ WorkerLoop ─▶ WorkerAPI.accept(model, request, send)
    EventStream ◀── NDJSON lines, per engine step ── send(lines)
    EventStream.aclose() ── cancel (pipe) ──────▶  WorkerAPI.cancel(request_id)

The request is the engine's own typed `GenerationRequest`, built and checked once in the HTTP
process; it travels with its model's name through LitServe's request queue to whichever worker
takes it (every worker serves every model). Messages come
back through LitServe's transport (ZMQ by default) as NDJSON lines, several events per message.
Cancels go through a pipe per worker made before the processes start (a pipe, not a
multiprocessing.Queue, whose lock a killed worker would hold forever). Liveness is out of band:
each worker writes its pid into a shared array, and a waiting stream checks the pid of the worker
that took its request (LitServe's START message names it).

Work-arounds for LitServe 0.2.19, all here:
- its ZMQ transport factory swaps the two addresses (requests hang): `use_zmq` builds it right;
  its publisher's start-up ping kills the first HTTP process's reader: `_ZMQTransport` sends none;
- a killed worker leaves its `get()` pending in the request queue's manager, which would swallow
  the next request: a restarted worker feeds it a no-op first (`WorkerAPI.setup`);
- a dead worker's streams are never ended in the HTTP processes: `EventStream` ends them itself;
- its streaming loop takes one request per event-loop turn and runs three generators and a task per
  request: `WorkerLoop` takes requests on a thread of their own and the engine sends messages itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import litserve as ls
import litserve.transport.factory as transport_factory
import zmq
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.server import StreamingRequestHandler
from litserve.transport.zmq_queue import Broker, Producer
from litserve.transport.zmq_transport import ZMQTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

from model.events import AnalysisRequest, GenerationRequest
from server import native
from server.errors import ERROR_STATUS, ApiError
from server.metrics import Metrics

log = logging.getLogger("attnserve.bridge")
INTERNAL_PATH = "/internal/generate"   # LitServe's route for the worker API; not on the public app
LIVENESS_CHECK_SECONDS = 1.0           # how often a waiting stream checks that its worker is alive
FLUSH = "flush"                        # the no-op request a restarted worker feeds a stale get()
LOADED_BYTES = 1 << 16                 # room for the workers' account of what they loaded
Send = Callable[[str], None]           # one message: NDJSON lines, each ending in a newline


class Links:
    """What connects the processes, made in the main process before any of them starts: a cancel
    pipe per worker, the workers' pids, and the count of requests in flight (all HTTP processes)."""

    def __init__(self, workers: int):
        spawn = mp.get_context("spawn")
        self.cancel_readers, self.cancel_writers = zip(*(spawn.Pipe(duplex=False) for _ in range(workers)))
        self.pids = spawn.Array("i", workers, lock=False)      # one writer each; readers poll
        self.in_flight = spawn.Value("i", 0)
        self._loaded = spawn.Array("c", LOADED_BYTES)          # what the first worker loaded, as JSON

    def publish_loaded(self, loaded: dict) -> None:
        """In a worker: say what it loaded (per model: dtype, quantization, kernels), for /v1/models."""
        data = json.dumps(loaded).encode()
        if len(data) < LOADED_BYTES:
            self._loaded.value = data

    def loaded(self) -> dict:
        """What the workers loaded, per model; {} until the first is ready."""
        data = self._loaded.value
        return json.loads(data) if data else {}


# -- the worker's side --------------------------------------------------------------------------
class WorkerAPI(ls.LitAPI):
    """A worker that takes requests and cancels and answers with messages; subclasses implement
    `load`, `accept` and `cancel` and never see LitServe."""

    def __init__(self, links: Links):
        super().__init__(api_path=INTERNAL_PATH, stream=True, loop=WorkerLoop())
        self.links = links
        self.request_queue = None          # set by AttnServer when it restarts this worker
        self.restarted = False

    def load(self, device: str, worker_id: int) -> None:
        raise NotImplementedError

    def accept(self, model: str, request: GenerationRequest | AnalysisRequest, send: Send) -> None:
        """Start one request for `model` (on the worker's event loop); its messages go to `send`."""
        raise NotImplementedError

    def cancel(self, request_id: str) -> None:
        """Stop a request (called from another thread)."""
        raise NotImplementedError

    def setup(self, device: str) -> None:
        worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self.load(device, worker_id)
        self.links.pids[worker_id] = os.getpid()
        reader = self.links.cancel_readers[worker_id]
        threading.Thread(target=self._relay_cancels, args=(reader,), name="cancels", daemon=True).start()
        if self.restarted and self.request_queue is not None:
            self.request_queue.put((0, f"flush-{os.getpid()}", time.monotonic(), FLUSH))

    def _relay_cancels(self, reader) -> None:
        while True:
            self.cancel(reader.recv_bytes().decode())

    def health(self) -> bool:
        # Called in the HTTP processes, which never run setup(): the workers' readiness is
        # LitServe's per-worker setup status (`AttnServer.workers_ready`).
        return True

    def predict(self, x, context):
        """Unused: WorkerLoop hands requests to `accept` (LitServe requires the method)."""
        raise NotImplementedError("requests reach the worker through WorkerLoop and accept()")


class WorkerLoop(LitLoop):
    """Takes requests from LitServe's queue on a thread of its own and hands each to
    `WorkerAPI.accept` on the event loop, with a `send` for its messages.

    The engine task holds the event loop for a whole step; requests that arrived during it start
    right after it, and the next step prefills them together (with LitServe's loop a burst of 32
    took 32 steps to get in)."""

    def pre_setup(self, lit_api, spec=None) -> None:
        """LitServe's loops check here that predict and encode_response are generators; this
        one calls neither."""

    def __call__(self, lit_api: WorkerAPI, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner) -> None:
        async def serve() -> None:
            loop, arrivals = asyncio.get_running_loop(), asyncio.Queue()

            def intake() -> None:
                while True:
                    item = request_queue.get()
                    loop.call_soon_threadsafe(arrivals.put_nowait, item)
                    if item == _SENTINEL_VALUE:
                        return

            threading.Thread(target=intake, name="intake", daemon=True).start()
            while (item := await arrivals.get()) != _SENTINEL_VALUE:
                response_queue_id, uid, _, payload = item
                if payload == FLUSH:
                    continue
                model, request = payload
                # START tells the HTTP side which worker took the request (its liveness check).
                self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                                  LoopResponseType.STREAMING)

                def send(message: str, response_queue_id=response_queue_id, uid=uid) -> None:
                    self.put_response(transport, response_queue_id, uid, message, LitAPIStatus.OK,
                                      LoopResponseType.STREAMING)
                lit_api.accept(model, request, send)

        try:
            asyncio.new_event_loop().run_until_complete(serve())
        except KeyboardInterrupt:
            self.kill()


# -- the server ---------------------------------------------------------------------------------
class AttnServer(ls.LitServer):
    """LitServer, plus a restarted worker's recovery, readiness and shutdown."""

    def launch_single_inference_worker(self, lit_api: WorkerAPI, worker_id: int):
        lit_api.request_queue = self._get_request_queue(lit_api.api_path)
        lit_api.restarted = True
        return super().launch_single_inference_worker(lit_api, worker_id)

    def workers_ready(self) -> bool:
        """Every inference worker has finished setup() (again, after a restart)."""
        status = self.workers_setup_status
        return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())

    def request_shutdown(self) -> None:
        """Stop every process (safe from a signal handler: sets LitServe's shutdown event on a thread)."""
        event = self._shutdown_event
        if event is not None:
            threading.Thread(target=event.set, daemon=True).start()


class _ZMQTransport(ZMQTransport):
    """LitServe's ZMQ transport, closable in processes that never used it, and without the ping its
    publisher sends to consumer 0 on start: that consumer cannot unpickle it, and its reader task
    then stops for good — every later answer to that HTTP process was lost (seen ~1 start in 10)."""

    def setup(self, operation, consumer_id: int | None = None) -> None:
        if operation != zmq.PUB:
            return super().setup(operation, consumer_id)
        self._zmq = Producer(address=self.backend_address)
        time.sleep(0.1)                   # as LitServe's: let the connection to the broker settle

    def close(self, **kwargs) -> None:
        if self._zmq:
            self._zmq.close()

    def __reduce__(self):
        return _ZMQTransport, (self.backend_address, self.frontend_address)


def _zmq_transport(config):
    broker = Broker()
    broker.start()
    config.frontend_address, config.backend_address = broker.frontend_address, broker.backend_address
    return _ZMQTransport(backend_address=broker.backend_address, frontend_address=broker.frontend_address)


def use_zmq(server: AttnServer) -> None:
    """Send the workers' messages over ZMQ, with the transport's addresses the right way round."""
    transport_factory._create_zmq_transport = _zmq_transport
    server.transport_config.transport_type = "zmq"


# -- the HTTP side ------------------------------------------------------------------------------
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


class Bridge:
    """The HTTP process's end: submit a request, read its messages, cancel it."""

    def __init__(self, server: AttnServer, api: WorkerAPI, links: Links, *, capacity: int,
                 max_request_seconds: float):
        self._handler = StreamingRequestHandler(api, server)
        self.links = links
        self.admission = Admission(links.in_flight, capacity)
        for writer in links.cancel_writers:
            os.set_blocking(writer.fileno(), False)   # a stuck worker must never block the event loop
        self.max_request_seconds = max_request_seconds

    async def open(self, request: GenerationRequest | AnalysisRequest, *, model: str, metrics: Metrics) -> EventStream:
        """Admit, submit to `model` and wait for the first event; raise ApiError if the worker refused.
        The stream's latencies and errors are counted in `metrics`."""
        self.admission.enter()
        arrived = time.perf_counter()
        request.request_id = uuid.uuid4().hex
        stream = EventStream(self, request.request_id, arrived, metrics)
        try:
            uid, _ = await self._handler._submit_request((model, request))
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
        for writer in self.links.cancel_writers:     # only the owning worker knows the id; all are told
            # < PIPE_BUF: one atomic write. A full or broken pipe: that worker is stuck or gone.
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                writer.send_bytes(request_id.encode())

    @staticmethod
    def worker_alive(pid: int | None) -> bool:
        """Whether the worker process that took a request (its pid then; None: not known yet) runs."""
        if pid is None:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class EventStream:
    """The events of one request, in order; always ends with a done or error event. Iterate it for
    event dicts, or `messages()` for them as they arrived together.

    Token lines go out as the worker wrote them: per token, this process does a deque pop and a
    prefix check, and parses JSON only for the other events."""

    def __init__(self, bridge: Bridge, request_id: str, arrived: float, metrics: Metrics):
        self.bridge, self.request_id, self.arrived, self.metrics = bridge, request_id, arrived, metrics
        self.deadline = arrived + bridge.max_request_seconds
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
                        self.metrics.error(event["error"]["type"])
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
                self.metrics.ttft.observe(time.perf_counter() - self.arrived)
            return line, None
        event = json.loads(line)
        if event["type"] in ("done", "error"):
            self._ended = True
        return line, event

    async def _receive(self) -> list[str]:
        """The next message's lines, or an error event's if the worker died or time ran out."""
        item = self._buffer[self._uid]
        while True:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                return [native.error_line("timeout", "the request ran past the server's limit of "
                                          f"{self.bridge.max_request_seconds:g} s")]
            if item.response_queue:
                break
            item.event.clear()
            try:
                async with asyncio.timeout(min(remaining, LIVENESS_CHECK_SECONDS)):
                    await item.event.wait()
            except TimeoutError:
                if not self.bridge.worker_alive(self._worker_pid):
                    # LitServe restarts a dead worker but never ends the streams it was serving.
                    return [native.error_line("internal_error", "the inference worker died; "
                                              "the server is restarting it, retry shortly")]
        data, status = item.response_queue.popleft()
        if self._worker_pid is None and item.worker_id is not None:
            self._worker_pid = self.bridge.links.pids[item.worker_id] or None   # its pid as it took this request
        if status != LitAPIStatus.OK:  # finished or failed without a last event: LitServe's silent error
            return [native.error_line("internal_error", "the inference worker stopped before finishing")]
        return data.splitlines()

    async def aclose(self) -> None:
        """Release everything; cancel the request in the worker if it is still running."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self.bridge.cancel(self.request_id)
        self.metrics.e2e.observe(time.perf_counter() - self.arrived)
        self.bridge.admission.leave()
        if self._buffer is not None:
            self._buffer.pop(self._uid, None)

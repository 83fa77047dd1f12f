"""The inference worker: a LitServe LitAPI that owns the model, its KV cache and the engine.

LitServe spawns one process per worker. In it, ONE task on the worker's event loop drives
`Engine.step()`: each step decodes all running requests together, whichever endpoint they came
from (continuous batching), and sends each request's new events to its HTTP process before the
next step. With no work the engine task sleeps on an event — no busy spin.

Why a task and not a thread: PyTorch releases the GIL around every op. With the event loop on a
second thread wanting it, a small model's decode step handed the GIL back and forth between CPUs
op by op and took 1.3–2× as long as alone. On one thread the step runs uninterrupted and the loop's
work (taking new requests, relaying cancels) fits between steps.

Requests go from LitServe's queue straight to the engine (`EngineLoop`), and the engine task sends
each request's messages itself: no task, queue or generator per request. (Those cost the
calculator, whose step for 32 requests takes ~2 ms, an eighth of its throughput at 32 streams.)

Cancellation: the HTTP process sees a client go away; it writes the request id into this worker's
cancel pipe (made before the processes start; a pipe, not a multiprocessing.Queue, whose lock a
killed worker would hold forever), which a small thread relays to `Engine.cancel` — the slot is
free at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import torch
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from model.checkpoint import load_checkpoint
from model.engine import Engine, Handle
from model.events import (
    AttentionSpec,
    ContextLengthExceeded,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    Started,
    Token,
)
from model.sampling import SamplingParams
from server import native
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("attnserve.worker")
INTERNAL_PATH = "/internal/generate"   # LitServe's route for this API; removed from the public app
TOMBSTONES = 4096                      # cancels remembered for requests that have not arrived yet
FLUSH = "_flush"                      # a no-op request (see EngineAPI.setup)
WORKER_PID = "_worker_pid"             # internal field of the start event, removed before it is sent


class EngineLoop(LitLoop):
    """The worker's loop: requests are taken from LitServe's queue on a thread of their own and
    handed to `EngineAPI.accept`, on the event loop, with a function that sends a message to the
    request's HTTP process.

    LitServe's streaming loop takes one request at a time through `run_in_executor(queue.get)`,
    and every hand-off waits for the event loop, which the engine task holds for a whole step:
    with a 34M-parameter model (30 ms steps at batch 32) a burst of 32 requests took 32 steps to
    get in. Here all that arrived during a step start right after it, and the next step prefills
    them together. LitServe would then run decode_request → predict → encode_response as a task
    per request and send what it yields; the engine task sends instead (see EngineRunner)."""

    def pre_setup(self, lit_api, spec=None) -> None:
        """LitServe's loops check here that predict and encode_response are generators; ours
        does not call them."""

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
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
                response_queue_id, uid, _, x = item
                self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                                  LoopResponseType.STREAMING)
                lit_api.accept(x, functools.partial(self.put_response, transport, response_queue_id, uid,
                                                    status=LitAPIStatus.OK,
                                                    response_type=LoopResponseType.STREAMING))

        try:
            asyncio.new_event_loop().run_until_complete(serve())
        except KeyboardInterrupt:
            self.kill()


class EngineAPI(ls.LitAPI):
    def __init__(self, settings: Settings, cancel_readers: list):
        super().__init__(api_path=INTERNAL_PATH, stream=True, loop=EngineLoop())
        self.settings = settings
        self.cancel_readers = cancel_readers
        self.runner: EngineRunner | None = None
        self.request_queue = None     # LitServe's request queue, set by AttnServer before a restart
        self.restarted = False

    def setup(self, device: str) -> None:
        settings = self.settings
        threads = settings.torch_threads
        torch.set_num_threads(threads)
        model, tokenizer = load_checkpoint(settings.checkpoint, device=device, dtype=settings.dtype,
                                           quantization=settings.quantization)
        engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_context=settings.max_context,
                        max_queue=settings.max_queue + settings.max_batch, kv_cache_dtype=settings.kv_cache_dtype)
        # A spawned worker has no logging set up of its own: configure it as __main__ does, so the
        # start-up lines (the kernel choice among them) reach the server's log.
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        log.info("weights: %s", engine.weights_info)
        worker = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        metrics = Metrics(settings.served_model_name, engine.max_context)
        self.runner = EngineRunner(engine, metrics, self.cancel_readers[worker], settings)
        self.runner.start()
        if self.restarted and self.request_queue is not None:
            # A killed worker leaves its get() pending in the request queue's manager, which
            # would swallow the next request. Feed it a no-op first.
            self.request_queue.put((0, f"flush-{os.getpid()}", time.monotonic(), {FLUSH: True}))
        log.info("worker %d ready: %s on %s, %d threads, %d slots × %d context", worker,
                 settings.checkpoint, device, threads, engine.max_batch, engine.max_context)

    def health(self) -> bool:
        # Called in the HTTP processes, which never run setup(): readiness of the workers
        # (model loaded) is LitServe's per-worker setup status, which /health already checks.
        return True

    def accept(self, x: dict, send: Callable[[str], None]) -> None:
        """Start one request (on the worker's event loop): its NDJSON messages go to `send`."""
        if x.get(FLUSH):
            return
        try:
            self.runner.submit(x, send)
        except Exception as e:  # a malformed internal request: fail it, keep the worker serving
            log.exception("request %s not accepted", x.get("request_id"))
            send(native.error_line("internal_error", f"request not accepted: {type(e).__name__}") + "\n")

    def predict(self, x: dict, context: dict):
        """Unused: EngineLoop hands requests to `accept` (LitServe requires the method)."""
        raise NotImplementedError("requests reach the engine through EngineLoop and accept()")


def to_engine_request(x: dict[str, Any]) -> GenerationRequest:
    """The internal payload the HTTP process built (plain, picklable) → an engine request."""
    attention = x.get("attention")
    if attention is not None:
        layers, heads = attention["layers"], attention["heads"]
        attention = AttentionSpec(layers=layers if layers == "all" else tuple(layers),
                                  heads=heads if isinstance(heads, str) else tuple(heads),
                                  include_prompt=attention["include_prompt"])
    return GenerationRequest(prompt_ids=x["prompt_ids"], max_tokens=x["max_tokens"],
                             sampling=SamplingParams(**x["sampling"]), seed=x.get("seed"),
                             stop=tuple(x.get("stop") or ()), logprobs=x.get("logprobs"),
                             ignore_eos=x.get("ignore_eos", False), attention=attention,
                             request_id=x["request_id"])


@dataclass(slots=True)
class _Stream:
    """Where one request's messages go, and its lines not yet sent."""

    send: Callable[[str], None]
    pending: list[str] = field(default_factory=list)
    sent_token_at: float | None = None    # when a message last carried a token
    last_token_at: float | None = None    # when the engine made the last token (for inter-token latency)


class EngineRunner:
    """Drives the engine as a task on the worker's event loop and sends each request's events.

    Each message carries every event of its request that is ready, and after the first token a
    stream waits out the stream interval before its next message: a small model makes a token
    every few hundred microseconds, and one message per token through the transport, the HTTP
    process and the client's parser costs more than the token. The start event, the first token
    and the last event go at once; other tokens wait at most the interval and one step."""

    def __init__(self, engine: Engine, metrics: Metrics, cancel_reader, settings: Settings):
        self.engine, self.metrics = engine, metrics
        self.tokenizer = engine.tokenizer
        self.model_name = settings.served_model_name
        self.interval = settings.stream_interval_ms / 1e3
        self._cancel_reader = cancel_reader
        self._streams: dict[str, _Stream] = {}
        self._tombstones: deque[str] = deque(maxlen=TOMBSTONES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work = asyncio.Event()                   # set when a request or cancel arrives
        self._task: asyncio.Task | None = None
        self._cancel_thread = threading.Thread(target=self._relay_cancels, name="cancels", daemon=True)

    def start(self) -> None:
        """Start relaying cancels. The engine task starts with the first request: LitServe's event
        loop does not run yet when `setup` does."""
        self._cancel_thread.start()

    def submit(self, x: dict[str, Any], send: Callable[[str], None]) -> None:
        """Called on the worker's event loop with the HTTP process's internal request. A request
        the engine refuses gets its error event at once."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="engine")
        request_id = x["request_id"]
        if request_id in self._tombstones:             # its client left before it got here
            send(native.error_line("cancelled", "the client disconnected") + "\n")
            return
        try:
            self.engine.submit(to_engine_request(x))
        except ContextLengthExceeded as e:
            send(native.error_line("context_length_exceeded", str(e), prompt_tokens=e.prompt_tokens,
                                   max_context=e.max_context) + "\n")
        except QueueFull as e:
            send(native.error_line("overloaded", str(e)) + "\n")
        except ValueError as e:
            send(native.error_line("invalid_request", str(e)) + "\n")
        else:
            self._streams[request_id] = _Stream(send)
            self._work.set()
            self.metrics.waiting.set(self.engine.num_waiting)

    def _relay_cancels(self) -> None:
        while True:
            request_id = self._cancel_reader.recv_bytes().decode()
            self._tombstones.append(request_id)
            self.engine.cancel(request_id)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._work.set)

    async def _run(self) -> None:
        engine = self.engine
        while True:
            if not engine.has_work():
                self._work.clear()
                await self._work.wait()
                continue
            if batch := engine.num_running:       # the requests this step decodes together
                self.metrics.decode_batch.observe(batch)
            try:
                handles = engine.step()
            except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
                log.exception("engine step failed")
                handles = engine.fail_all("internal_error", f"generation failed: {type(e).__name__}")
            self._deliver(handles)
            self.metrics.running.set(engine.num_running)
            self.metrics.waiting.set(engine.num_waiting)
            self.metrics.kv_usage.set(engine.kv_usage)
            await asyncio.sleep(0)                # the loop takes new requests in

    def _deliver(self, handles: list[Handle]) -> None:
        """Format this step's events and send each request's lines that are due (see the class)."""
        now = time.perf_counter()
        for handle in handles:
            stream = self._streams.get(handle.request_id)   # (every request the engine took has one)
            if handle.finished:
                self._streams.pop(handle.request_id, None)
            if stream is None:
                continue
            stream.pending += [native.line(self._format(e, stream)) for e in _drain(handle)]
            if handle.finished or stream.sent_token_at is None or now - stream.sent_token_at >= self.interval:
                if stream.pending[-1].startswith(native.TOKEN_LINE):
                    stream.sent_token_at = now
                stream.send("\n".join(stream.pending) + "\n")
                stream.pending.clear()

    def _format(self, event, stream: _Stream) -> dict:
        m = self.metrics
        if isinstance(event, Token):
            if stream.last_token_at is not None:
                m.itl.observe(event.time - stream.last_token_at)
            stream.last_token_at = event.time
            return native.token_event(event, self.tokenizer)
        if isinstance(event, Started):
            m.queue_time.observe(event.queue_time)
            m.prompt_tokens.observe(len(event.prompt_ids))
            m.prompt_tokens_total.inc(len(event.prompt_ids))
            start = native.start_event(event, self.tokenizer, self.model_name)
            start[WORKER_PID] = os.getpid()      # internal: lets the HTTP side notice if we die
            return start
        if isinstance(event, Finished):   # (TTFT and e2e are timed in the HTTP process, from arrival)
            m.generation_tokens.observe(event.completion_tokens)
            m.generation_tokens_total.inc(event.completion_tokens)
            if event.finish_reason != "cancelled":
                m.success(event.finish_reason)
            else:
                m.error("cancelled")
            return native.done_event(event)
        assert isinstance(event, Failed)   # (counted by the HTTP process that sends it: once)
        return native.failed_event(event)


def _drain(handle: Handle) -> list:
    events = []
    while handle.events:
        events.append(handle.events.popleft())
    return events

"""The inference worker: the model, its KV cache and the engine, in a process LitServe spawns.

ONE task on the worker's event loop drives `Engine.step()`: each step decodes all running requests
together, whichever endpoint they came from (continuous batching), and sends each request's new
events to its HTTP process before the next step. With no work the task sleeps on an event.

A task and not a thread: PyTorch releases the GIL around every op, and with the event loop on a
second thread wanting it, a small model's decode step would hand the GIL back and forth between
CPUs op by op (1.3–2× as long as alone). On one thread the step runs uninterrupted and the loop's
work (taking new requests in) fits between steps.

How requests, messages and cancels get here is server/bridge.py's business; this module sees a
typed `GenerationRequest`, a `send` for its messages, and `cancel(request_id)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.checkpoint import load_checkpoint
from model.engine import Engine, Handle
from model.events import AnalysisRequest, Analyzed, Failed, Finished, GenerationRequest, QueueFull, Started, Token
from model.limits import RequestRefused
from server import native
from server.bridge import Links, Send, WorkerAPI
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("attnserve.worker")
TOMBSTONES = 4096                      # cancels remembered for requests that have not arrived yet


class EngineAPI(WorkerAPI):
    def __init__(self, settings: Settings, links: Links):
        super().__init__(links)
        self.settings = settings
        self.runner: EngineRunner | None = None

    def load(self, device: str, worker_id: int) -> None:
        settings = self.settings
        torch.set_num_threads(settings.torch_threads)
        # A spawned worker has no logging set up of its own: configure it as __main__ does, so the
        # start-up lines (the kernel choice among them) reach the server's log.
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        served = {}
        for name, checkpoint in settings.models().items():
            model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=settings.dtype,
                                               quantization=settings.quantization,
                                               fused_max_rows=0 if settings.decode_step == "python" else None)
            engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_context=settings.max_context,
                            max_queue=settings.max_queue + settings.max_batch,
                            max_attention_floats=settings.max_attention_floats, kv_cache_dtype=settings.kv_cache_dtype)
            served[name] = Served(name, engine, Metrics(name, engine.max_context))
            log.info("worker %d: %s from %s on %s, %d slots × %d context; weights: %s", worker_id, name, checkpoint,
                     device, engine.max_batch, engine.max_context, engine.weights_info)
        self.runner = EngineRunner(served, settings)
        if worker_id == 0:
            self.links.publish_loaded({name: m.engine.weights_info for name, m in served.items()})
        log.info("worker %d ready: %d model(s), %d threads", worker_id, len(served), settings.torch_threads)

    def accept(self, model: str, request: GenerationRequest | AnalysisRequest, send: Send) -> None:
        try:
            self.runner.submit(model, request, send)
        except Exception as e:  # a malformed internal request: fail it, keep the worker serving
            log.exception("request %s not accepted", getattr(request, "request_id", "?"))
            send(native.error_line("internal_error", f"request not accepted: {type(e).__name__}") + "\n")

    def cancel(self, request_id: str) -> None:
        self.runner.cancel(request_id)


@dataclass(slots=True)
class Served:
    """One served model in this worker: its engine and its metrics."""

    name: str
    engine: Engine
    metrics: Metrics


@dataclass(slots=True)
class _Stream:
    """Where one request's messages go, and its lines not yet sent."""

    model: Served
    send: Send
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

    def __init__(self, models: dict[str, Served], settings: Settings):
        self.models = models
        self.interval = settings.stream_interval_ms / 1e3
        self._streams: dict[str, _Stream] = {}
        self._tombstones: deque[str] = deque(maxlen=TOMBSTONES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work = asyncio.Event()                   # set when a request or cancel arrives
        self._task: asyncio.Task | None = None

    def submit(self, model: str, request: GenerationRequest | AnalysisRequest, send: Send) -> None:
        """Start a request for one model, on the worker's event loop (where the engine task starts
        with the first one). A request the engine refuses gets its error event at once."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="engine")
        if request.request_id in self._tombstones:     # its client left before it got here
            send(native.error_line("cancelled", "the client disconnected") + "\n")
            return
        served = self.models[model]
        try:
            served.engine.submit(request)
        except RequestRefused as e:
            send(native.error_line(e.error_type, str(e), **e.details) + "\n")
        except QueueFull as e:
            send(native.error_line("overloaded", str(e)) + "\n")
        else:
            self._streams[request.request_id] = _Stream(served, send)
            self._work.set()
            served.metrics.waiting.set(served.engine.num_waiting)

    def cancel(self, request_id: str) -> None:
        """Stop a request, waiting or running, or refuse it if it arrives later (any thread)."""
        self._tombstones.append(request_id)
        stream = self._streams.get(request_id)
        for served in [stream.model] if stream is not None else self.models.values():
            served.engine.cancel(request_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._work.set)

    async def _run(self) -> None:
        while True:
            busy = [served for served in self.models.values() if served.engine.has_work()]
            if not busy:
                self._work.clear()
                await self._work.wait()
                continue
            for served in busy:                   # one step of each model with work, in turn
                self._step(served)
            await asyncio.sleep(0)                # the loop takes new requests in

    def _step(self, served: Served) -> None:
        engine, m = served.engine, served.metrics
        if batch := engine.num_running:           # the requests this step decodes together
            m.decode_batch.observe(batch)
        try:
            handles = engine.step()
        except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
            log.exception("engine step failed (%s)", served.name)
            handles = engine.fail_all("internal_error", f"generation failed: {type(e).__name__}")
        self._deliver(handles)
        m.running.set(engine.num_running)
        m.waiting.set(engine.num_waiting)
        m.kv_usage.set(engine.kv_usage)

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
        m, tokenizer = stream.model.metrics, stream.model.engine.tokenizer
        if isinstance(event, Token):
            if stream.last_token_at is not None:
                m.itl.observe(event.time - stream.last_token_at)
            stream.last_token_at = event.time
            return native.token_event(event, tokenizer)
        if isinstance(event, Started):
            m.queue_time.observe(event.queue_time)
            m.prompt_tokens.observe(len(event.prompt_ids))
            m.prompt_tokens_total.inc(len(event.prompt_ids))
            return native.start_event(event, tokenizer, stream.model.name)
        if isinstance(event, Analyzed):
            m.queue_time.observe(event.queue_time)
            m.prompt_tokens.observe(len(event.ids))
            m.prompt_tokens_total.inc(len(event.ids))
            return native.analysis_event(event, tokenizer, stream.model.name)
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

"""The inference worker: a LitServe LitAPI that owns the model, its KV cache and the engine.

LitServe spawns one process per worker. In it, `enable_async=True` runs every request as an asyncio
task (`predict`), and ONE more task on the same event loop drives `Engine.step()`: each step decodes
all running requests together, whichever endpoint they came from (continuous batching), puts each
request's events on its queue, and yields to the loop, which sends them while the next step waits.
With no work the engine task sleeps on an event — no busy spin.

Why a task and not a thread: PyTorch releases the GIL around every op. With the event loop on a
second thread wanting it, a small model's decode step handed the GIL back and forth between CPUs
op by op and took 1.3–2× as long as alone. On one thread the step runs uninterrupted and the loop's
work (sending events, taking new requests) fits between steps.

Cancellation: the HTTP process sees a client go away; it writes the request id into this worker's
cancel pipe (made before the processes start; a pipe, not a multiprocessing.Queue, whose lock a
killed worker would hold forever), which a small thread relays to `Engine.cancel` — the slot is
free at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import litserve as ls
import torch
from litserve.loops.base import _SENTINEL_VALUE
from litserve.loops.streaming_loops import StreamingLoop
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


class EngineLoop(StreamingLoop):
    """LitServe's async streaming loop, taking requests in on a thread of its own.

    LitServe's loop takes one request at a time through `run_in_executor(request_queue.get)`, and
    every hand-off waits for the event loop, which the engine task holds for a whole step: with a
    34M-parameter model (30 ms steps at batch 32) a burst of 32 requests took 32 steps to get in.
    Here a thread blocks on the queue and passes each request to the loop as it arrives, so all
    that arrived during a step start right after it, and the next step prefills them together."""

    def run_streaming_loop_async(self, lit_api, request_queue, transport, callback_runner) -> None:
        async def serve() -> None:
            loop, arrivals = asyncio.get_running_loop(), asyncio.Queue()

            def intake() -> None:
                while True:
                    item = request_queue.get()
                    loop.call_soon_threadsafe(arrivals.put_nowait, item)
                    if item == _SENTINEL_VALUE:
                        return

            threading.Thread(target=intake, name="intake", daemon=True).start()
            tasks: set[asyncio.Task] = set()
            while (item := await arrivals.get()) != _SENTINEL_VALUE:
                response_queue_id, uid, _, _ = item
                self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                                  LoopResponseType.STREAMING)
                task = asyncio.create_task(self._process_streaming_request(item, lit_api, transport,
                                                                           callback_runner))
                tasks.add(task)                    # (the loop keeps only weak references to tasks)
                task.add_done_callback(tasks.discard)

        try:
            asyncio.new_event_loop().run_until_complete(serve())
        except KeyboardInterrupt:
            self.kill()


class EngineAPI(ls.LitAPI):
    def __init__(self, settings: Settings, cancel_readers: list):
        super().__init__(api_path=INTERNAL_PATH, stream=True, enable_async=True, loop=EngineLoop())
        self.settings = settings
        self.cancel_readers = cancel_readers
        self.runner: EngineRunner | None = None
        self.request_queue = None     # LitServe's request queue, set by AttnServer before a restart
        self.restarted = False

    def setup(self, device: str) -> None:
        settings = self.settings
        threads = settings.torch_threads
        torch.set_num_threads(threads)
        model, tokenizer = load_checkpoint(settings.checkpoint, device=device)
        engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_context=settings.max_context,
                        max_queue=settings.max_queue + settings.max_batch)
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

    async def decode_request(self, request: dict, context: dict) -> dict:
        return request

    async def predict(self, x: dict, context: dict):
        """One request's native events, from submission to done (or error)."""
        if x.get(FLUSH):
            return
        runner = self.runner
        try:
            queue = runner.submit(to_engine_request(x))
        except ContextLengthExceeded as e:
            error = native.error_event("context_length_exceeded", str(e), prompt_tokens=e.prompt_tokens,
                                       max_context=e.max_context)
        except QueueFull as e:
            error = native.error_event("overloaded", str(e))
        except ValueError as e:
            error = native.error_event("invalid_request", str(e))
        else:
            error = None
        if error is not None:
            yield native.line(error) + "\n"
            return
        # Each message carries every event that is ready, and after the first token a stream waits
        # out the stream interval before its next message: a small model makes a token every few
        # hundred microseconds, and one message per token through the transport, the HTTP process
        # and the client's parser costs more than the token. The first token goes at once; no
        # event waits longer than the interval.
        interval, loop = self.settings.stream_interval_ms / 1e3, asyncio.get_running_loop()
        sent_token_at: float | None = None
        finished = False
        try:
            while not finished:
                events = [await queue.get()]
                wait = sent_token_at + interval - loop.time() if sent_token_at is not None else 0
                if wait > 0 and events[0]["type"] == "token":
                    await asyncio.sleep(wait)
                while not queue.empty():
                    events.append(queue.get_nowait())
                finished = events[-1]["type"] in ("done", "error")
                yield "".join(native.line(e) + "\n" for e in events)
                if events[-1]["type"] == "token":
                    sent_token_at = loop.time()
        finally:
            if not finished:
                runner.cancel(x["request_id"])

    async def encode_response(self, output, context: dict):
        async for lines in output:
            yield lines  # NDJSON text: LitServe sends a str unchanged, as one message


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


class EngineRunner:
    """Drives the engine as a task on the worker's event loop; delivers each request's events to
    its asyncio queue."""

    def __init__(self, engine: Engine, metrics: Metrics, cancel_reader, settings: Settings):
        self.engine, self.metrics, self.settings = engine, metrics, settings
        self.tokenizer = engine.tokenizer
        self.model_name = settings.served_model_name
        self._cancel_reader = cancel_reader
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_token: dict[str, float] = {}
        self._tombstones: deque[str] = deque(maxlen=TOMBSTONES)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work = asyncio.Event()                   # set when a request or cancel arrives
        self._task: asyncio.Task | None = None
        self._cancel_thread = threading.Thread(target=self._relay_cancels, name="cancels", daemon=True)

    def start(self) -> None:
        """Start relaying cancels. The engine task starts with the first request: LitServe's event
        loop does not run yet when `setup` does."""
        self._cancel_thread.start()

    def submit(self, request: GenerationRequest) -> asyncio.Queue:
        """Called on the worker's event loop. Raises what Engine.submit raises."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="engine")
        queue = asyncio.Queue()
        if request.request_id in self._tombstones:    # its client left before it got here
            queue.put_nowait(native.error_event("cancelled", "the client disconnected"))
            return queue
        self._queues[request.request_id] = queue
        try:
            self.engine.submit(request)
        except Exception:
            del self._queues[request.request_id]
            raise
        self._work.set()
        self.metrics.waiting.set(self.engine.num_waiting)
        return queue

    def cancel(self, request_id: str) -> None:
        """Called on the worker's event loop."""
        self.engine.cancel(request_id)
        self._work.set()

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
            await asyncio.sleep(0)                # the loop sends these events, takes new requests

    def _deliver(self, handles: list[Handle]) -> None:
        """Format this step's events and put them on their requests' queues."""
        for handle in handles:
            queue = self._queues.get(handle.request_id)
            events = [self._format(e) for e in _drain(handle)]
            if handle.finished:
                self._queues.pop(handle.request_id, None)
                self._last_token.pop(handle.request_id, None)
            if queue is not None:
                for event in events:
                    queue.put_nowait(event)

    def _format(self, event) -> dict:
        m, now = self.metrics, event.time
        if isinstance(event, Token):
            last = self._last_token.get(event.request_id)
            if last is not None:
                m.itl.observe(now - last)
            self._last_token[event.request_id] = now
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

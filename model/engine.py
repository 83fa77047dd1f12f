"""The generation engine: continuous batching over the slot KV cache.

    engine = Engine(model, tokenizer, max_batch=16)
    for event in engine.generate(GenerationRequest(prompt_ids=tokenizer.encode("two plus three equals"))):
        ...                                    # Started, then Token …, then Finished
    engine.analyze(AnalysisRequest(ids=tokenizer.encode("two plus three equals five")))   # → Analyzed

Each `step()`:
  1. applies cancellations (their slots are free for this very step);
  2. admits waiting requests into free slots, FIFO, and prefills their prompts — together, in
     batches of similar lengths — sampling each one's first token;
  3. runs ONE batched decode step over every request that was already running, each slot at
     its own position, and samples one token per row;
  4. turns tokens into events: text deltas (incremental detokenization, stop strings withheld
     until decided), logprobs, attention rows, logit-lens rows — and frees the slots of finished
     requests.
An analyze request (`AnalysisRequest`) is prefill-only: it is admitted and prefilled like a prompt,
batched with the step's other prompts, and leaves in the same step with one Analyzed event (see
model/analysis.py) and its Finished; its slot is free again for the next group.

`submit` and `cancel` are thread-safe; `step` belongs to one thread (the server runs it as a task
on its worker's event loop, asleep while `has_work()` is false). Attention is computed on the
explicit path only in steps where some request asked for it, and only for the layers asked for;
the same holds for the residual streams the logit lens reads (model/logit_lens.py).
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.analysis import analyze_row, token_logprobs
from model.detokenizer import IncrementalDetokenizer
from model.events import (
    AnalysisRequest,
    Analyzed,
    AttentionSpec,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    LensTop,
    QueueFull,
    Started,
    Token,
)
from model.limits import Limits
from model.logit_lens import position_lens, prompt_lens
from model.quantization import resolve_kv_cache_dtype, weights_info
from model.sampling import Sampled, SamplingBatch, sample
from model.stops import StopMatcher
from model.tokenizer import Tokenizer
from model.transformer import ModelOutput, Transformer

PREFILL_TOKENS = 4096   # padded prompt tokens per prefill forward (attention capture makes B·T² weights)


class Handle:
    """The caller's side of one request: its events arrive in `events` (a thread-safe deque)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.events: deque[Event] = deque()
        self.finished = False


@dataclass(eq=False)
class _Sequence:
    """The engine's side of one request (an analyze request uses the fields up to `admitted`)."""

    request: GenerationRequest | AnalysisRequest
    handle: Handle
    detokenizer: IncrementalDetokenizer | None
    stops: StopMatcher | None
    generator: torch.Generator | None
    submitted: float
    ids: list[int]                      # the tokens to prefill: a prompt, or a text to analyze
    analyzing: bool = False
    slot: int = -1
    length: int = 0                     # tokens in the slot's cache
    last_token: int = -1                # sampled, not yet fed to the model
    generated: int = 0
    text: list[str] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float | None = None
    layers: tuple[int, ...] = ()        # attention layers to capture
    lens_layers: tuple[int, ...] = ()   # residual streams the logit lens reads

    @property
    def wants_penalties(self) -> bool:
        sp = self.request.sampling
        return sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 8,
                 max_context: int | None = None, max_queue: int = 64, max_attention_floats: int | None = None,
                 kv_cache_dtype: str | torch.dtype | None = "auto"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.embed_tokens.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.limits = Limits.of(model.config, max_context=max_context, max_attention_floats=max_attention_floats)
        self.max_context = self.limits.max_context
        kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, model.embed_tokens.weight.dtype)
        self.cache = model.new_cache(max_batch, self.max_context, dtype=kv_dtype)
        self._free = list(range(max_batch))          # a min-heap: low slots first keeps batches contiguous
        self._active: list[_Sequence] = []           # sorted by slot; touched by the stepping thread only
        self._waiting: deque[_Sequence] = deque()
        self._admitting: list[_Sequence] = []       # taken from the queue this step, not yet prefilled
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._batch_seqs: list[_Sequence] = []       # the rows of the cached SamplingBatch
        self._batch: SamplingBatch | None = None
        self._step_seqs: list[_Sequence] = []        # the rows of the last decode step, and its inputs:
        self._slots: slice | Tensor = slice(0, 0)    # reused while the same sequences decode again
        self._positions: Tensor | None = None        # (B, 1)
        self._next_tokens: Tensor | None = None      # (B, 1) the tokens that step sampled
        self._step_layers: list[int] = []
        self._step_lens: list[int] = []              # layers whose residual streams the lens reads
        self._counts: Tensor | None = None           # (max_batch, V) generated-token counts, for penalties
        self._seen: Tensor | None = None             # (max_batch, V) tokens in prompt or output

    # -- the caller's side (any thread) ---------------------------------------------------------
    def submit(self, request: GenerationRequest | AnalysisRequest) -> Handle:
        self.limits.check(request)
        request.request_id = request.request_id or uuid.uuid4().hex
        if isinstance(request, AnalysisRequest):
            seq = _Sequence(request=request, handle=Handle(request.request_id), detokenizer=None, stops=None,
                            generator=None, submitted=time.perf_counter(), ids=request.ids, analyzing=True)
        else:
            seq = _Sequence(request=request, handle=Handle(request.request_id),
                            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_ids),
                            stops=StopMatcher(request.stop) if request.stop else None,
                            generator=self._generator(request.seed), submitted=time.perf_counter(),
                            ids=request.prompt_ids)
        n_layers = self.model.config.n_layers
        if request.attention is not None:
            seq.layers = request.attention.layer_ids(n_layers)
        if request.lens is not None:
            seq.lens_layers = request.lens.layer_ids(n_layers)
        if seq.analyzing:                               # its logits come from the last layer's stream
            seq.lens_layers = tuple(sorted({*seq.lens_layers, n_layers - 1}))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._waiting.append(seq)
        return seq.handle

    def cancel(self, request_id: str) -> None:
        """Stop a request (waiting or running); its slot is free at the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self._active or self._waiting or self._cancelled)

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def weights_info(self) -> dict:
        """JSON-able: the compute dtype, quantization, kernels per batch size and KV-cache dtype."""
        info = weights_info(self.model)
        info["kv_cache_dtype"] = str(self.cache.kv.dtype).removeprefix("torch.")
        return info

    @property
    def kv_usage(self) -> float:
        """Fraction of the cache's positions that running requests occupy."""
        return sum(s.length for s in self._active) / (self.max_batch * self.max_context)

    def generate(self, request: GenerationRequest | AnalysisRequest) -> Iterator[Event]:
        """Submit and drive the engine from this thread until the request finishes."""
        handle = self.submit(request)
        try:
            while True:
                if not handle.events:
                    self.step()
                while handle.events:
                    event = handle.events.popleft()
                    yield event
                    if isinstance(event, Finished | Failed):
                        return
        finally:
            if not handle.finished:
                self.cancel(handle.request_id)

    def analyze(self, request: AnalysisRequest) -> Analyzed:
        """Submit, drive the engine from this thread until the request is done, return its result."""
        events = list(self.generate(request))
        if not isinstance(events[0], Analyzed):
            raise RuntimeError(f"analyze request {request.request_id} ended without a result: {events[-1]}")
        return events[0]

    # -- the stepping thread ------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Handle]:
        """One scheduling round; returns the handles that received events."""
        touched: list[Handle] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                for seq in [s for s in self._waiting if s.request.request_id in cancelled]:
                    self._waiting.remove(seq)
                    touched.append(self._finish(seq, "cancelled"))
            admitted = self._admitting = []
            n_free = len(self._free) + sum(s.request.request_id in cancelled for s in self._active)
            while self._waiting and len(admitted) < n_free:
                admitted.append(self._waiting.popleft())
        for seq in [s for s in self._active if s.request.request_id in cancelled]:
            touched.append(self._finish(seq, "cancelled"))

        running = list(self._active)                  # decode only those that ran before this step
        for group in _prefill_groups(admitted):
            touched.extend(self._prefill(group))
        if running:
            touched.extend(self._decode(running))
        return touched

    def fail_all(self, error_type: str, message: str) -> list[Handle]:
        """End every request with a Failed event and free all slots (after a step raised)."""
        with self._lock:
            seqs = list(dict.fromkeys([*self._active, *self._admitting, *self._waiting]))
            self._waiting, self._admitting = deque(), []
            self._cancelled.clear()
        self._active.clear()
        self._free = list(range(self.max_batch))
        self._batch_seqs, self._step_seqs = [], []
        for seq in seqs:
            seq.handle.events.append(Failed(seq.request.request_id, error_type, message))
            seq.handle.finished = True
        return [s.handle for s in seqs]

    def _prefill(self, seqs: list[_Sequence]) -> list[Handle]:
        """Prefill these prompts in one forward, right-padded to the longest, and sample each one's
        first token. Padding writes keys and values past a prompt's end in its slot, where nothing
        reads them (a query sees keys up to its own position) and decoding overwrites them."""
        now = time.perf_counter()
        for seq in seqs:
            seq.slot = heapq.heappop(self._free)
            seq.admitted = now
        analyzed = [s for s in seqs if s.analyzing]
        lengths = [len(s.ids) for s in seqs]
        T = max(lengths)
        tokens = torch.tensor([s.ids + [0] * (T - n) for s, n in zip(seqs, lengths)],
                              device=self.device)                                     # (B, T)
        positions = torch.arange(T, device=self.device).expand(len(seqs), T)
        slots = self._slot_index([s.slot for s in seqs])
        layers = sorted({layer for s in seqs for layer in s.layers})
        hidden = {layer for s in seqs for layer in s.lens_layers}
        if any(getattr(s.request, "prompt_logprobs", None) is not None for s in seqs):
            hidden.add(self.model.config.n_layers - 1)            # prompt logprobs read the last stream
        hidden = sorted(hidden)
        last = -1 if min(lengths) == T else torch.tensor(lengths, device=self.device) - 1   # (B,)
        out = self.model(tokens, positions=positions, cache=self.cache, slots=slots, attn_layers=layers,
                         hidden_layers=hidden, logits_at=last)
        for row in [r for r, s in enumerate(seqs) if s.analyzing]:
            self._analyze(seqs[row], out, row, lengths[row])
        rows = [r for r, s in enumerate(seqs) if not s.analyzing]   # the generating sequences' batch rows
        if analyzed:
            seqs, lengths = [seqs[r] for r in rows], [lengths[r] for r in rows]
            if not seqs:
                return [s.handle for s in analyzed]
        for seq, n in zip(seqs, lengths):
            seq.length = n
            if seq.wants_penalties:
                self._reset_penalty_state(seq)
        self._active.extend(seqs)
        self._active.sort(key=lambda s: s.slot)
        logits = out.logits[:, -1] if len(rows) == len(out.logits) else out.logits[rows, -1]   # (B', V)
        sampled = self._sample(logits, seqs)
        token_ids = sampled.token_ids.tolist()
        lens = self._prefill_lens(seqs, out, rows, lengths) if hidden else {}
        for i, (row, seq, n) in enumerate(zip(rows, seqs, lengths)):
            spec = seq.request.attention
            weights = None
            if spec is not None:                                                    # (L, H, n, n)
                weights = _select_heads(out.attentions, seq.layers, spec, row=row)[:, :, :n, :n]
            prompt_lens, first_lens = lens.get(i, (None, None))
            prompt_logprobs = prompt_top = None
            if (top_n := seq.request.prompt_logprobs) is not None:       # the same math as analyze
                prompt_logprobs, prompt_top, _ = token_logprobs(self.model, out, row=row, ids=seq.ids, top_n=top_n)
            seq.handle.events.append(Started(
                request_id=seq.request.request_id, prompt_ids=list(seq.request.prompt_ids),
                prompt_attention=weights if spec and spec.include_prompt else None,
                queue_time=seq.admitted - seq.submitted, prompt_lens=prompt_lens,
                prompt_logprobs=prompt_logprobs, prompt_top_logprobs=prompt_top))
            first_row = weights[:, :, -1] if weights is not None else None            # (L, H, n)
            self._on_token(seq, token_ids[i], sampled, i, first_row, lens=first_lens)
        return [s.handle for s in [*analyzed, *seqs]]

    def _decode(self, running: list[_Sequence]) -> list[Handle]:
        if running == self._step_seqs:
            # The same sequences as last step (eq=False: compared by identity): their inputs are
            # last step's samples, one position on. No host→device copies, no new tensors.
            tokens = self._next_tokens
            self._positions += 1
        else:
            self._slots = self._slot_index([s.slot for s in running])
            tokens = torch.tensor([[s.last_token] for s in running], device=self.device)   # (B, 1)
            self._positions = torch.tensor([[s.length] for s in running], device=self.device)  # (B, 1)
            self._step_layers = sorted({layer for s in running for layer in s.layers})
            self._step_lens = sorted({layer for s in running for layer in s.lens_layers})
            self._step_seqs = list(running)
        out = self.model(tokens, positions=self._positions, cache=self.cache, slots=self._slots,
                         attn_layers=self._step_layers, hidden_layers=self._step_lens, lens_logits=True)
        for s in running:
            s.length += 1
        sampled = self._sample(out.logits[:, -1], running)
        self._next_tokens = sampled.token_ids[:, None]
        token_ids = sampled.token_ids.tolist()                # one device→host copy for the batch
        lens = self._decode_lens(out, running) if self._step_lens else None
        for row, seq in enumerate(running):
            rows = None
            if seq.request.attention is not None:
                rows = _select_heads(out.attentions, seq.layers, seq.request.attention, row=row)
                rows = rows[:, :, 0, : seq.length]                                      # (L, H, S)
            self._on_token(seq, token_ids[row], sampled, row, rows, lens=lens.get(row) if lens else None)
        return [s.handle for s in running]

    def _analyze(self, seq: _Sequence, out: ModelOutput, row: int, n: int) -> None:
        """An analyze request's result from its prefill row; its slot is free again at once."""
        spec = seq.request.attention
        weights = None
        if spec is not None:                                                        # (L, H, n, n)
            weights = _select_heads(out.attentions, seq.layers, spec, row=row)[:, :, :n, :n]
        seq.handle.events.append(analyze_row(self.model, seq.request, out, row=row, attention=weights,
                                             queue_time=seq.admitted - seq.submitted))
        seq.first_token = time.perf_counter()                 # the result's time, for Finished.ttft
        heapq.heappush(self._free, seq.slot)
        seq.slot = -1
        self._finish(seq, "stop")

    def _prefill_lens(self, seqs: list[_Sequence], out: ModelOutput, rows: list[int],
                      lengths: list[int]) -> dict[int, tuple[LensTop | None, LensTop]]:
        """(prompt rows or None, first token's rows) for each prefilled generation that asked for
        the lens, by its index in `seqs`."""
        wants = [(i, (row, n, s.request.lens)) for i, (row, s, n) in enumerate(zip(rows, seqs, lengths))
                 if s.request.lens is not None]
        return dict(zip([i for i, _ in wants], prompt_lens(self.model, out.hidden, [w for _, w in wants])))

    def _decode_lens(self, out: ModelOutput, running: list[_Sequence]) -> dict[int, LensTop]:
        """The (L, k) lens rows of this step's query, for each row that asked: one pass through the head."""
        wants = [(row, 0, s.request.lens) for row, s in enumerate(running) if s.request.lens is not None]
        tops = position_lens(self.model, out.hidden, wants, self.model.config.n_layers, logits=out.lens_logits)
        return {row: top for (row, _, _), top in zip(wants, tops)}

    def _slot_index(self, slot_ids: list[int]) -> slice | Tensor:
        """A slice where the slots are consecutive (the cache reads them as a view), else a tensor."""
        first, n = slot_ids[0], len(slot_ids)
        if slot_ids == list(range(first, first + n)):
            return slice(first, first + n)
        return torch.tensor(slot_ids, device=self.device)

    def _sample(self, logits: Tensor, seqs: list[_Sequence]) -> Sampled:
        if seqs != self._batch_seqs:                           # identity, as in _decode
            self._batch_seqs = list(seqs)
            self._batch = SamplingBatch.from_params([s.request.sampling for s in seqs], self.device)
        counts = seen = None
        if self._batch.any_penalty:
            index = torch.tensor([s.slot for s in seqs], device=self.device)
            counts, seen = self._counts[index], self._seen[index]
        n_top = max((s.request.logprobs or 0 for s in seqs), default=0)
        return sample(logits, self._batch, [s.generator for s in seqs], generated_counts=counts,
                      seen=seen, num_logprobs=n_top,
                      want_logprobs=any(s.request.logprobs is not None for s in seqs))

    def _on_token(self, seq: _Sequence, token_id: int, sampled: Sampled, row: int,
                  attention: Tensor | None, *, lens: LensTop | None = None) -> None:
        request = seq.request
        seq.last_token = token_id
        seq.generated += 1
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        if seq.wants_penalties:
            self._counts[seq.slot, token_id] += 1
            self._seen[seq.slot, token_id] = True

        finish = None
        if token_id == self.tokenizer.eos_id and not request.ignore_eos:
            finish, text = "stop", ""
        else:
            text = seq.detokenizer.push(token_id)
            if seq.stops is not None:
                text, stopped = seq.stops.push(text)
                finish = "stop" if stopped else None
        if finish is None and (seq.generated >= request.max_tokens or seq.length >= self.max_context):
            finish = "length"
        if finish is not None and not (seq.stops is not None and seq.stops.stopped):
            text += self._flush(seq)
            if seq.stops is not None and seq.stops.stopped:
                finish = "stop"                                  # the held-back tail held a stop string

        logprob = top = None
        if request.logprobs is not None:
            logprob = float(sampled.logprobs[row])
            if request.logprobs:
                top = [(int(i), float(lp)) for i, lp in
                       zip(sampled.top_ids[row, : request.logprobs], sampled.top_logprobs[row, : request.logprobs])
                       if lp != float("-inf")]
        seq.text.append(text)
        seq.handle.events.append(Token(request_id=request.request_id, index=seq.generated - 1, id=token_id,
                                       text=text, logprob=logprob, top_logprobs=top, attention=attention,
                                       lens=lens))
        if finish is not None:
            self._finish(seq, finish)

    def _flush(self, seq: _Sequence) -> str:
        tail = seq.detokenizer.flush()
        if seq.stops is None:
            return tail
        tail, stopped = seq.stops.push(tail)
        return tail if stopped else tail + seq.stops.flush()

    def _finish(self, seq: _Sequence, reason: str) -> Handle:
        if seq.slot >= 0:
            self._active.remove(seq)
            heapq.heappush(self._free, seq.slot)
        now = time.perf_counter()
        seq.handle.events.append(Finished(
            request_id=seq.request.request_id, finish_reason=reason, text="".join(seq.text),
            prompt_tokens=len(seq.ids), completion_tokens=seq.generated,
            queue_time=(seq.admitted or now) - seq.submitted,
            ttft=seq.first_token - seq.submitted if seq.first_token else None, total_time=now - seq.submitted))
        seq.handle.finished = True
        return seq.handle

    def _reset_penalty_state(self, seq: _Sequence) -> None:
        if self._counts is None:
            V = self.model.config.vocab_size
            self._counts = torch.zeros(self.max_batch, V, device=self.device)
            self._seen = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
        self._counts[seq.slot] = 0
        self._seen[seq.slot] = False
        self._seen[seq.slot, torch.tensor(seq.request.prompt_ids, device=self.device)] = True

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)


def _prefill_groups(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """Split the admitted sequences into prefill batches, shortest prompts first: padding never
    makes up more than half of a batch's tokens (one long prompt is not padded 32 times), and a
    batch holds at most PREFILL_TOKENS padded tokens unless one prompt alone is longer."""
    groups: list[list[_Sequence]] = []
    real = 0                                        # the last group's prompt tokens
    for seq in sorted(seqs, key=lambda s: len(s.ids)):
        n = len(seq.ids)                            # the longest so far: the padded length
        padded = (len(groups[-1]) + 1) * n if groups else 0
        if groups and padded <= 2 * (real + n) and padded <= PREFILL_TOKENS:
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups


def _select_heads(weights: dict[int, Tensor], layers: tuple[int, ...], spec: AttentionSpec,
                  *, row: int) -> Tensor:
    """One row's weights for the requested layers and heads: (L, H, T, S) as float32 on the CPU."""
    stacked = torch.stack([weights[layer][row] for layer in layers])         # (L, nh, T, S)
    if spec.heads == "mean":
        stacked = stacked.mean(dim=1, keepdim=True)                            # (L, 1, T, S)
    elif spec.heads != "all":
        stacked = stacked[:, list(spec.heads)]                                 # (L, H, T, S)
    return stacked.float().cpu()

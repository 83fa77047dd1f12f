"""What goes into the engine (a `GenerationRequest` or an `AnalysisRequest`) and what comes out
(typed events).

Plain, picklable dataclasses and tensors: the HTTP process builds the request from its validated
Pydantic body and hands it to the worker as it is; the worker turns the events into API.md's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from model.limits import FinishReason
from model.sampling import SamplingParams

HeadSelection = Literal["all", "mean"] | tuple[int, ...]
EndReason = Literal[FinishReason, "cancelled"]


@dataclass(frozen=True)
class AttentionSpec:
    """Which attention weights a request wants back."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    heads: HeadSelection = "all"
    include_prompt: bool = True

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers == "all" else tuple(self.layers)

    def head_count(self, n_heads: int) -> int:
        return {"all": n_heads, "mean": 1}.get(self.heads) or len(self.heads)


@dataclass(frozen=True)
class LensSpec:
    """Which logit-lens rows a request wants back: for layer ℓ, the top_k of
    softmax(lm_head(final_norm(h_ℓ))), h_ℓ the residual stream after layer ℓ (0-based)."""

    layers: Literal["all"] | tuple[int, ...] = "all"
    top_k: int = 5
    include_prompt: bool = False        # generation only: Started carries the prompt's lens too

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers == "all" else tuple(self.layers)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None        # None: none; 0: the chosen token's; N: plus the top N
    ignore_eos: bool = False
    attention: AttentionSpec | None = None
    lens: LensSpec | None = None
    prompt_logprobs: int | None = None  # None: none; N: each prompt token's logprob and its top N
    request_id: str = ""


@dataclass
class AnalysisRequest:
    """A teacher-forced look at a given text: one prefill over `ids`, nothing generated.

    ids: the text's token ids, BOS already added by the caller. attention: as for generation
    (heads may be "mean"; include_prompt is ignored: the whole text is read). logprobs: per
    position, the actual token's logprob, plus the top-N alternatives when N > 0. lens: the logit
    lens at every position (its include_prompt is ignored). completion_start: the index in `ids`
    of the first completion token, for prompt + completion scoring (None: no scoring).
    """

    ids: list[int]
    attention: AttentionSpec | None = None
    logprobs: int = 0
    lens: LensSpec | None = None
    completion_start: int | None = None
    request_id: str = ""


class QueueFull(RuntimeError):
    """The engine's wait queue is full; try again later."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        super().__init__(f"the engine's wait queue is full ({max_queue} waiting requests)")


@dataclass
class LensTop:
    """Logit-lens rows: for each layer of `layers`, the top-k token ids (int64) and their
    probabilities (float32), most probable first. One token's: ids/probs (layers, k); a text's:
    (layers, T, k), position q being what the model would predict for q + 1 after that layer."""

    layers: tuple[int, ...]
    ids: Tensor
    probs: Tensor


@dataclass
class Started:
    """The prompt has been read (prefilled). prompt_attention: (layers, heads, T, T) or None;
    prompt_lens: (layers, T, k) rows when the request's lens has include_prompt, else None;
    prompt_logprobs / prompt_top_logprobs: as Analyzed's logprobs / top_logprobs over the prompt,
    when the request's prompt_logprobs is set (top_logprobs None when it is 0)."""

    request_id: str
    prompt_ids: list[int]
    prompt_attention: Tensor | None
    queue_time: float                   # seconds from submit to admission
    prompt_lens: LensTop | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    time: float = field(default_factory=time.perf_counter)


@dataclass
class Token:
    """One generated token. attention: (layers, heads, keys) and lens: (layers, k) rows, both of
    the step that produced it (its query position)."""

    request_id: str
    index: int
    id: int
    text: str                           # the text delta (may be "" while a stop string is undecided)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    attention: Tensor | None = None
    lens: LensTop | None = None
    time: float = field(default_factory=time.perf_counter)


@dataclass
class Analyzed:
    """An AnalysisRequest's result (then Finished follows). Per position i of the n `ids`:

    logprobs[i]      log p(ids[i] | ids[:i]); None at 0 (nothing predicts the first token)
    top_logprobs[i]  the top-N (id, logprob) of the distribution ids[i] was drawn against ([] at 0);
                     None when N = 0
    attention        (layers, heads, n, n) float32 post-softmax weights, causal (zeros above the
                     diagonal: row q's keys are 0..q); None when not asked
    lens             (layers, n, k) rows; None when not asked
    completion_logprob  the sum of logprobs[completion_start:]; None without a completion_start
    """

    request_id: str
    ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]] | None
    attention: Tensor | None
    lens: LensTop | None
    completion_logprob: float | None
    queue_time: float                   # seconds from submit to admission
    time: float = field(default_factory=time.perf_counter)


@dataclass
class Finished:
    request_id: str
    finish_reason: EndReason
    text: str                           # the whole completion: all Token.text deltas joined
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    ttft: float | None                  # seconds from submit to the first token (None: no token)
    total_time: float
    time: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_second(self) -> float:
        decode = self.total_time - (self.ttft or 0.0)
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


@dataclass
class Failed:
    """The engine could not go on with this request (the step raised); nothing more will come."""

    request_id: str
    error_type: str
    message: str
    time: float = field(default_factory=time.perf_counter)


Event = Started | Token | Analyzed | Finished | Failed

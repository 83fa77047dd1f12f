"""What goes into the engine (a `GenerationRequest`) and what comes out (typed events).

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
    request_id: str = ""


class QueueFull(RuntimeError):
    """The engine's wait queue is full; try again later."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        super().__init__(f"the engine's wait queue is full ({max_queue} waiting requests)")


@dataclass
class Started:
    """The prompt has been read (prefilled). prompt_attention: (layers, heads, T, T) or None."""

    request_id: str
    prompt_ids: list[int]
    prompt_attention: Tensor | None
    queue_time: float                   # seconds from submit to admission
    time: float = field(default_factory=time.perf_counter)


@dataclass
class Token:
    """One generated token. attention: (layers, heads, keys) for the step that produced it."""

    request_id: str
    index: int
    id: int
    text: str                           # the text delta (may be "" while a stop string is undecided)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    attention: Tensor | None = None
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


Event = Started | Token | Finished | Failed

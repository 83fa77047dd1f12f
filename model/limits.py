"""What a request may ask of a model, and the one check of it.

`Limits` holds a served model's shape and the server's bounds — a few integers, no weights — so the
HTTP process can check a request exactly as the engine will before anything is queued (a refusal
then gets its real status before any stream byte), and the worker runs the same `check` as a guard.

Torch-free: the HTTP schemas (and through them the Python client) import the bounds from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.events import AnalysisRequest, GenerationRequest

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
MAX_LENS_TOP_K = 20  # logit-lens entries per layer and position
FinishReason = Literal["stop", "length"]  # how a generation that ran to its end finished


class RequestRefused(ValueError):
    """A request the model cannot run. `error_type` and `details` go into API.md's error body."""

    error_type = "invalid_request"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class InvalidRequest(RequestRefused):
    """A field outside what this model takes (a layer or head it does not have, a token id past
    its vocabulary); `details["param"]` names the field."""


class ContextLengthExceeded(RequestRefused):
    """The prompt does not fit in the context."""

    error_type = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds at most {max_context}",
                         prompt_tokens=prompt_tokens, max_context=max_context)
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class AttentionPayloadTooLarge(RequestRefused):
    """The attention and logit-lens numbers a request would send back exceed the server's limit."""

    error_type = "attention_payload_too_large"

    def __init__(self, floats: int, limit: int):
        super().__init__(f"this request's attention and logit lens would be {floats} numbers; the limit is "
                         f"{limit}: ask for fewer layers or heads, heads \"mean\", a smaller top_k, a shorter "
                         "text or fewer max_tokens, or include_prompt false", floats=floats, limit=limit)
        self.floats, self.limit = floats, limit


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    n_layers: int
    n_heads: int
    max_context: int                           # tokens per slot: prompt + generated
    max_attention_floats: int | None = None    # the most attention + lens numbers one request gets back

    @classmethod
    def of(cls, config: ModelConfig, *, max_context: int | None = None,
           max_attention_floats: int | None = None) -> Limits:
        """The model's limits; `max_context` may only lower the model's own."""
        return cls(vocab_size=config.vocab_size, n_layers=config.n_layers, n_heads=config.n_heads,
                   max_context=min(max_context or config.max_context, config.max_context),
                   max_attention_floats=max_attention_floats)

    def check(self, request: GenerationRequest | AnalysisRequest) -> None:
        """Raise a RequestRefused naming the field and the limit, for a request that can't run."""
        if hasattr(request, "prompt_ids"):                 # a GenerationRequest
            self._check_ids(request.prompt_ids, "prompt_ids")
            if request.max_tokens < 1:
                raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}", param="max_tokens")
            if request.logprobs is not None:
                self._check_logprobs(request.logprobs)
            if request.prompt_logprobs is not None:
                self._check_logprobs(request.prompt_logprobs, "prompt_logprobs")
        else:                                               # an AnalysisRequest
            self._check_ids(request.ids, "ids")
            self._check_logprobs(request.logprobs)
            n, start = len(request.ids), request.completion_start
            if start is not None and not 1 <= start < n:
                raise InvalidRequest(f"completion_start must be in [1, {n - 1}] (an index into the {n} ids, "
                                     f"after the first), got {start}", param="completion")
        if (spec := request.attention) is not None:
            self._check_indices(spec.layers, "attention.layers", self.n_layers)
            self._check_indices(spec.heads, "attention.heads", self.n_heads)
        if (lens := request.lens) is not None:
            self._check_indices(lens.layers, "logit_lens.layers", self.n_layers)
            top = min(MAX_LENS_TOP_K, self.vocab_size)
            if isinstance(lens.top_k, bool) or not isinstance(lens.top_k, int) or not 1 <= lens.top_k <= top:
                raise InvalidRequest(f"logit_lens.top_k must be an int in [1, {top}], got {lens.top_k!r}",
                                     param="logit_lens.top_k")
        limit = self.max_attention_floats
        if limit is not None and (floats := self.payload_floats(request)) > limit:
            raise AttentionPayloadTooLarge(floats, limit)

    def payload_floats(self, request: GenerationRequest | AnalysisRequest) -> int:
        """How many numbers the request's attention and logit lens would send back, at most: one
        per attention weight (layer, head, query, causal key) and two per lens entry (id, prob).

        A generation's tokens are counted up to its max_tokens or the context's end, whichever
        comes first; token i's attention row has n + i keys (n = prompt length)."""
        if hasattr(request, "prompt_ids"):
            n = len(request.prompt_ids)
            generated = max(0, min(request.max_tokens, self.max_context - n + 1))
            rows, positions = generated * n + generated * (generated - 1) // 2, generated
            if request.attention is not None and request.attention.include_prompt:
                rows += n * (n + 1) // 2
            if request.lens is not None and request.lens.include_prompt:
                positions += n
        else:
            n = len(request.ids)
            rows, positions = n * (n + 1) // 2, n                  # every query q over keys 0..q
        floats = 0
        if (spec := request.attention) is not None:
            floats += len(spec.layer_ids(self.n_layers)) * spec.head_count(self.n_heads) * rows
        if (lens := request.lens) is not None:
            floats += 2 * len(lens.layer_ids(self.n_layers)) * lens.top_k * positions
        return floats

    def _check_ids(self, ids: Sequence[int], name: str) -> None:
        if not ids:
            raise InvalidRequest(f"{name} is empty: there is nothing to read", param=name)
        if len(ids) > self.max_context:
            raise ContextLengthExceeded(len(ids), self.max_context)
        if bad := [t for t in ids if not 0 <= t < self.vocab_size][:5]:
            raise InvalidRequest(f"{name} must be token ids in [0, {self.vocab_size}), got {bad}", param=name)

    @staticmethod
    def _check_logprobs(logprobs: int, name: str = "logprobs") -> None:
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {logprobs}", param=name)

    @staticmethod
    def _check_indices(values: str | Sequence[int], name: str, limit: int) -> None:
        if isinstance(values, str):
            return
        if not values:
            raise InvalidRequest(f"{name} must be a non-empty list of indices in [0, {limit}), got []", param=name)
        if not all(0 <= i < limit for i in values):
            raise InvalidRequest(f"{name} must be indices in [0, {limit}), got {list(values)}", param=name)

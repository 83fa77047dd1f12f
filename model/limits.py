"""What a request may ask of a model, and the one check of it.

`Limits` holds a served model's shape and the server's bounds — a few integers, no weights — so the
HTTP process can check a request exactly as the engine will before anything is queued (a refusal
then gets its real status before any stream byte), and the worker runs the same `check` as a guard.

Torch-free: the HTTP schemas (and through them the Python client) import the bounds from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.events import AttentionSpec, GenerationRequest

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
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
    error_type = "attention_payload_too_large"


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    n_layers: int
    n_heads: int
    max_context: int                           # tokens per slot: prompt + generated
    max_attention_floats: int | None = None    # the largest attention payload of one request; None: any

    @classmethod
    def of(cls, config: ModelConfig, *, max_context: int | None = None,
           max_attention_floats: int | None = None) -> Limits:
        """The model's limits; `max_context` may only lower the model's own."""
        return cls(vocab_size=config.vocab_size, n_layers=config.n_layers, n_heads=config.n_heads,
                   max_context=min(max_context or config.max_context, config.max_context),
                   max_attention_floats=max_attention_floats)

    def check(self, request: GenerationRequest) -> None:
        """Raise a RequestRefused naming the field and the limit, for a request that can't run."""
        n = len(request.prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty (prompt_ids has no tokens)", param="prompt_ids")
        if n > self.max_context:
            raise ContextLengthExceeded(n, self.max_context)
        if bad := [t for t in request.prompt_ids if not 0 <= t < self.vocab_size][:5]:
            raise InvalidRequest(f"token ids must be in [0, {self.vocab_size}), got {bad}", param="prompt_ids")
        if request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {request.max_tokens}", param="max_tokens")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}",
                                 param="logprobs")
        if request.attention is not None:
            self._check_attention(request.attention, n, request.max_tokens)

    def _check_attention(self, spec: AttentionSpec, n: int, max_tokens: int) -> None:
        for name, values, limit in (("layers", spec.layers, self.n_layers), ("heads", spec.heads, self.n_heads)):
            if not isinstance(values, str) and not all(0 <= i < limit for i in values):
                raise InvalidRequest(f"attention.{name} must be indices in [0, {limit}), got {list(values)}",
                                     param=f"attention.{name}")
        if self.max_attention_floats is None:
            return
        layers, heads = len(spec.layer_ids(self.n_layers)), spec.head_count(self.n_heads)
        generated = min(max_tokens, self.max_context - n + 1)
        rows = generated * n + generated * (generated - 1) // 2     # token i's row has n + i keys
        if spec.include_prompt:
            rows += n * (n + 1) // 2
        floats = layers * heads * rows
        if floats > self.max_attention_floats:
            raise AttentionPayloadTooLarge(
                f"this request's attention would be {floats} numbers ({layers} layers × {heads} heads × "
                f"{rows} rows·keys); the limit is {self.max_attention_floats}: ask for fewer layers or "
                "heads, heads \"mean\", fewer max_tokens, or include_prompt false",
                floats=floats, limit=self.max_attention_floats)

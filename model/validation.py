"""What the engine accepts: one check per request kind, against the model's limits, and the size
of what a request would send back.

These need the model's config and the context length, never its weights, so the server can run
them before a request leaves the HTTP process (a refusal gets its real status before any stream
byte); `Engine.submit` runs the same ones as a guard. Every refusal names the field and the limit:
ContextLengthExceeded, PayloadTooLarge (when a limit is given), else ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.config import ModelConfig
from model.events import (
    AnalyzeRequest,
    AttentionSpec,
    ContextLengthExceeded,
    GenerationRequest,
    LensSpec,
    PayloadTooLarge,
)
from model.sampling import MAX_LOGPROBS

MAX_LENS_TOP_K = 20


def validate(request: GenerationRequest | AnalyzeRequest, config: ModelConfig, *, max_context: int,
             max_payload_floats: int | None = None) -> None:
    """Check either kind of request (see validate_generation / validate_analyze)."""
    check = validate_analyze if isinstance(request, AnalyzeRequest) else validate_generation
    check(request, config, max_context=max_context, max_payload_floats=max_payload_floats)


def validate_generation(request: GenerationRequest, config: ModelConfig, *, max_context: int,
                        max_payload_floats: int | None = None) -> None:
    _check_ids(request.prompt_ids, "prompt_ids", config, max_context)
    if request.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}")
    _check_attention(request.attention, config)
    _check_lens(request.lens, config)
    _check_payload(request, config, max_context, max_payload_floats)


def validate_analyze(request: AnalyzeRequest, config: ModelConfig, *, max_context: int,
                     max_payload_floats: int | None = None) -> None:
    _check_ids(request.ids, "ids", config, max_context)
    if not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}")
    n, start = len(request.ids), request.completion_start
    if start is not None and not 1 <= start < n:
        raise ValueError(f"completion_start must be in [1, {n - 1}] (an index into the {n} ids, after the "
                         f"first), got {start}")
    _check_attention(request.attention, config)
    _check_lens(request.lens, config)
    _check_payload(request, config, max_context, max_payload_floats)


def payload_floats(request: GenerationRequest | AnalyzeRequest, config: ModelConfig, *,
                   max_context: int) -> int:
    """How many numbers the request's attention and logit lens would produce, at most: attention
    weights (one per layer, head, query and causal key) plus two per lens entry (id and prob).

    A generation's tokens are counted up to its max_tokens or the context's end, whichever is
    first; token i's attention row has n + i keys (n = prompt length)."""
    if isinstance(request, AnalyzeRequest):
        n = len(request.ids)
        rows, positions = n * (n + 1) // 2, n                      # every query q over keys 0..q
    else:
        n = len(request.prompt_ids)
        generated = max(0, min(request.max_tokens, max_context - n + 1))
        rows = generated * n + generated * (generated - 1) // 2
        positions = generated
        if request.attention is not None and request.attention.include_prompt:
            rows += n * (n + 1) // 2
        if request.lens is not None and request.lens.include_prompt:
            positions += n
    floats = 0
    if (spec := request.attention) is not None:
        heads = {"all": config.n_heads, "mean": 1}[spec.heads] if isinstance(spec.heads, str) else len(spec.heads)
        floats += len(spec.layer_ids(config.n_layers)) * heads * rows
    if (lens := request.lens) is not None:
        floats += 2 * len(lens.layer_ids(config.n_layers)) * lens.top_k * positions
    return floats


def _check_ids(ids: Sequence[int], name: str, config: ModelConfig, max_context: int) -> None:
    n = len(ids)
    if n == 0:
        raise ValueError(f"{name} is empty")
    if n > max_context:
        raise ContextLengthExceeded(n, max_context)
    if not all(0 <= t < config.vocab_size for t in ids):
        raise ValueError(f"{name} must be token ids in [0, {config.vocab_size})")


def _check_indices(values: Sequence[int], name: str, limit: int) -> None:
    if len(values) == 0 or not all(0 <= i < limit for i in values):
        raise ValueError(f"{name} must be a non-empty list of indices in [0, {limit}), got {list(values)}")


def _check_attention(spec: AttentionSpec | None, config: ModelConfig) -> None:
    if spec is None:
        return
    if spec.layers != "all":
        _check_indices(spec.layers, "attention.layers", config.n_layers)
    if spec.heads not in ("all", "mean"):
        _check_indices(spec.heads, "attention.heads", config.n_heads)


def _check_lens(spec: LensSpec | None, config: ModelConfig) -> None:
    if spec is None:
        return
    if spec.layers != "all":
        _check_indices(spec.layers, "lens.layers", config.n_layers)
    top = min(MAX_LENS_TOP_K, config.vocab_size)
    if isinstance(spec.top_k, bool) or not isinstance(spec.top_k, int) or not 1 <= spec.top_k <= top:
        raise ValueError(f"lens.top_k must be an int in [1, {top}], got {spec.top_k!r}")


def _check_payload(request: GenerationRequest | AnalyzeRequest, config: ModelConfig, max_context: int,
                   limit: int | None) -> None:
    if limit is not None and (floats := payload_floats(request, config, max_context=max_context)) > limit:
        raise PayloadTooLarge(floats, limit)

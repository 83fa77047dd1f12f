"""Engine events → the native event dicts of API.md, and native events → one response.

The worker streams native events (start, token…, done | error) for every endpoint; the HTTP side
passes them through as NDJSON, folds them into one JSON response, or re-shapes them as OpenAI
chunks. Attention tensors become nested lists here: [layer][head][key] per token and ragged
[layer][head][query][key] rows (query q has q + 1 keys) for the prompt.
"""

from __future__ import annotations

import json

from torch import Tensor

from model.events import Failed, Finished, Started, Token
from model.tokenizer import Tokenizer

DECIMALS = 5  # attention probabilities are rounded: rows still sum to 1 ± 1e-4
TOKEN_LINE = '{"type":"token"'  # how `line` writes a token event: the HTTP side passes those through


def line(event: dict) -> str:
    """One event as an NDJSON line (no newline): compact, "type" first, UTF-8 left as is."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def start_event(event: Started, tokenizer: Tokenizer, model_name: str) -> dict:
    out = {"type": "start", "id": f"gen-{event.request_id}", "model": model_name,
           "prompt_tokens": [{"id": i, "text": tokenizer.token_text(i)} for i in event.prompt_ids]}
    if event.prompt_attention is not None:
        out["prompt_attention"] = ragged_rows(event.prompt_attention)
    return out


def token_event(event: Token, tokenizer: Tokenizer) -> dict:
    out = {"type": "token", "index": event.index, "id": event.id, "text": event.text}
    if event.logprob is not None:
        out["logprob"] = event.logprob
    if event.top_logprobs is not None:
        out["top_logprobs"] = [{"id": i, "text": tokenizer.token_text(i), "logprob": lp}
                               for i, lp in event.top_logprobs]
    if event.attention is not None:
        out["attention"] = event.attention.double().round(decimals=DECIMALS).tolist()
    return out


def done_event(event: Finished) -> dict:
    ttft = event.ttft if event.ttft is not None else event.total_time
    return {"type": "done", "finish_reason": event.finish_reason, "text": event.text,
            "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                      "total_tokens": event.prompt_tokens + event.completion_tokens},
            "timings": {"queue_ms": round(event.queue_time * 1e3, 3), "ttft_ms": round(ttft * 1e3, 3),
                        "total_ms": round(event.total_time * 1e3, 3),
                        "tokens_per_second": round(event.tokens_per_second, 2)}}


def error_event(error_type: str, message: str, **extra) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message, **extra}}


def error_line(error_type: str, message: str, **extra) -> str:
    return line(error_event(error_type, message, **extra))


def failed_event(event: Failed) -> dict:
    return error_event(event.error_type, event.message)


def ragged_rows(weights: Tensor) -> list:
    """(L, H, T, T) causal weights → [layer][head][q] rows of q + 1 entries."""
    full = weights.double().round(decimals=DECIMALS).tolist()
    return [[[row[: q + 1] for q, row in enumerate(head)] for head in layer] for layer in full]


def collect(events: list[dict]) -> dict:
    """Fold a finished stream (start, tokens, done) into the non-streaming response of API.md."""
    start, tokens, done = events[0], events[1:-1], events[-1]
    response = {"id": start["id"], "model": start["model"], "text": done["text"],
                "tokens": [{k: v for k, v in t.items() if k not in ("type", "index")} for t in tokens],
                "prompt_tokens": start["prompt_tokens"], "finish_reason": done["finish_reason"],
                "usage": done["usage"], "timings": done["timings"]}
    if "prompt_attention" in start:
        response["prompt_attention"] = start["prompt_attention"]
    return response

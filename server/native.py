"""Engine events → the native event dicts of API.md, and native events → one response.

The worker streams native events (start, token…, done | error) for every endpoint; the HTTP side
passes them through as NDJSON, folds them into one JSON response, or re-shapes them as OpenAI
chunks. Attention tensors become nested lists here: [layer][head][key] per token and ragged
[layer][head][query][key] rows (query q has q + 1 keys) for the prompt.
"""

from __future__ import annotations

import json

from torch import Tensor

from model.events import Analyzed, Failed, Finished, LensTop, Started, Token
from model.tokenizer import Tokenizer

DECIMALS = 5  # attention probabilities are rounded: rows still sum to 1 ± 1e-4
LENS_DECIMALS = 6  # logit-lens probabilities
TOKEN_LINE = '{"type":"token"'  # how `line` writes a token event: the HTTP side passes those through


def line(event: dict) -> str:
    """One event as an NDJSON line (no newline): compact, "type" first, UTF-8 left as is."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def start_event(event: Started, tokenizer: Tokenizer, model_name: str) -> dict:
    out = {"type": "start", "id": f"gen-{event.request_id}", "model": model_name,
           "prompt_tokens": [{"id": i, "text": tokenizer.token_text(i)} for i in event.prompt_ids]}
    if event.prompt_logprobs is not None:           # asked for (OpenAI echo / prompt_logprobs): as analyze's tokens
        _add_logprobs(out["prompt_tokens"], event.prompt_logprobs, event.prompt_top_logprobs, tokenizer)
    if event.prompt_attention is not None:
        out["prompt_attention"] = ragged_rows(event.prompt_attention)
    if event.prompt_lens is not None:
        out["prompt_logit_lens"] = lens_entries(event.prompt_lens, tokenizer)
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
    if event.lens is not None:
        out["logit_lens"] = lens_entries(event.lens, tokenizer)
    return out


def _add_logprobs(tokens: list[dict], logprobs: list[float | None],
                  top_logprobs: list[list[tuple[int, float]]] | None, tokenizer: Tokenizer) -> None:
    """Each {id, text} token entry gets its logprob (and its top_logprobs when there are some)."""
    for i, (entry, logprob) in enumerate(zip(tokens, logprobs)):
        entry["logprob"] = logprob
        if top_logprobs is not None:
            entry["top_logprobs"] = [{"id": t, "text": tokenizer.token_text(t), "logprob": lp}
                                     for t, lp in top_logprobs[i]]


def analysis_event(event: Analyzed, tokenizer: Tokenizer, model_name: str) -> dict:
    """An analysis as one event: the body of API.md's /v1/analyze response, with "type"."""
    tokens = [{"id": token, "text": tokenizer.token_text(token)} for token in event.ids]
    _add_logprobs(tokens, event.logprobs, event.top_logprobs, tokenizer)
    out = {"type": "analysis", "id": f"ana-{event.request_id}", "model": model_name, "tokens": tokens}
    if event.attention is not None:
        out["attention"] = ragged_rows(event.attention)
    if event.lens is not None:
        out["logit_lens"] = {"layers": list(event.lens.layers), "top": lens_entries(event.lens, tokenizer)}
    if event.completion_logprob is not None:
        out["completion_logprob"] = event.completion_logprob
    out["usage"] = {"prompt_tokens": len(event.ids), "total_tokens": len(event.ids)}
    return out


def lens_entries(lens: LensTop, tokenizer: Tokenizer) -> list:
    """Logit-lens rows → [layer](…)[k] of {id, text, prob}: (L, k) rows for one position, (L, T, k) for many."""
    probs = lens.probs.double().round(decimals=LENS_DECIMALS).tolist()

    def entries(ids: list, ps: list) -> list:
        if ids and isinstance(ids[0], list):
            return [entries(i, p) for i, p in zip(ids, ps)]
        return [{"id": i, "text": tokenizer.token_text(i), "prob": p} for i, p in zip(ids, ps)]
    return entries(lens.ids.tolist(), probs)


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
    for name in ("prompt_attention", "prompt_logit_lens"):
        if name in start:
            response[name] = start[name]
    return response

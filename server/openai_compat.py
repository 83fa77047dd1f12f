"""Native events → OpenAI-compatible completions and chat completions (JSON and SSE chunks).

The worker streams the same native events for every endpoint; this module reshapes them in the
HTTP process. Shapes follow OpenAI's (the unmodified `openai` SDK parses them); attention is an
extension: `prompt_tokens`/`prompt_attention` on the response (first chunk) and `tokens`/`attention`
on each choice, present only when the request asked for attention.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from server.schemas import LOGPROB_FLOOR

Kind = Literal["completion", "chat"]


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


@dataclass
class OpenAIFormatter:
    """Per-request state for turning native events into OpenAI objects."""

    kind: Kind
    model: str
    include_usage: bool = False
    logprobs: int | None = None           # None: no logprobs asked; N: top N alternatives
    attention: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    _offset: int = 0

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    # -- streaming ----------------------------------------------------------------------------
    def chunks(self, event: dict) -> list[dict]:
        """The SSE payloads one native event becomes (possibly none)."""
        kind = event["type"]
        if kind == "start":
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + event["id"].removeprefix("gen-")
            if self.kind == "completion" and not self.attention:
                return []
            first = self._chunk([self._choice(role=True)] if self.kind == "chat" else [self._choice(text="")])
            if self.attention:
                first["prompt_tokens"] = event["prompt_tokens"]
                if "prompt_attention" in event:
                    first["prompt_attention"] = event["prompt_attention"]
            return [first]
        if kind == "token":
            return [self._chunk([self._choice(text=event["text"], tokens=[event])])]
        if kind == "done":
            out = [self._chunk([self._choice(text="", finish_reason=event["finish_reason"])])]
            if self.include_usage:
                out.append(self._chunk([], usage=event["usage"]))
            return out
        return [{"error": {"message": event["error"]["message"], "type": event["error"]["type"],
                           "code": None, "param": None}}]

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": choices}
        if usage is not None or self.include_usage:
            chunk["usage"] = usage
        return chunk

    def _choice(self, *, text: str = "", tokens: list[dict] = (), finish_reason: str | None = None,
                role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text or tokens else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason}
        if tokens:
            if self.logprobs is not None:
                choice["logprobs"] = self._logprobs(tokens)
            if self.attention:
                choice["tokens"] = [{"id": t["id"], "text": t["text"]} for t in tokens]
                choice["attention"] = [t["attention"] for t in tokens if "attention" in t]
        return choice

    # -- one JSON response --------------------------------------------------------------------
    def response(self, events: list[dict]) -> dict:
        start, tokens, done = events[0], events[1:-1], events[-1]
        self.chunks(start)                                # sets the id
        text = done["text"]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "text": text, "finish_reason": done["finish_reason"]}
        if self.logprobs is not None:
            choice["logprobs"] = self._logprobs(tokens)
        if self.attention:
            choice["tokens"] = [{"id": t["id"], "text": t["text"]} for t in tokens]
            choice["attention"] = [t["attention"] for t in tokens if "attention" in t]
        out = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice], "usage": done["usage"]}
        if self.attention:
            out["prompt_tokens"] = start["prompt_tokens"]
            if "prompt_attention" in start:
                out["prompt_attention"] = start["prompt_attention"]
        return out

    def _logprobs(self, tokens: list[dict]) -> dict:
        if self.kind == "chat":
            return {"content": [{
                "token": t["text"], "logprob": _lp(t["logprob"]), "bytes": list(t["text"].encode()),
                "top_logprobs": [{"token": alt["text"], "logprob": _lp(alt["logprob"]),
                                  "bytes": list(alt["text"].encode())} for alt in t.get("top_logprobs", [])],
            } for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t["text"])
        out = {"tokens": [t["text"] for t in tokens], "token_logprobs": [_lp(t["logprob"]) for t in tokens],
               "text_offset": offsets}
        if self.logprobs:
            out["top_logprobs"] = [{alt["text"]: _lp(alt["logprob"]) for alt in t.get("top_logprobs", [])}
                                   for t in tokens]
        return out

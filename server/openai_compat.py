"""Native events → OpenAI-compatible completions and chat completions (JSON and SSE chunks).

The worker streams the same native events for every endpoint; this module reshapes them in the
HTTP process. Shapes follow OpenAI's (the unmodified `openai` SDK parses them); attention is an
extension: `prompt_tokens`/`prompt_attention` on the response (first chunk) and `tokens`/`attention`
on each choice, present only when the request asked for attention.

Completions with `echo` send the prompt first (its text; with `logprobs`, its tokens' logprobs from
the prefill, the first one null, as OpenAI's legacy completions did); `prompt_logprobs` (vLLM's
extension) puts {token id: {logprob, rank, decoded_token}} per prompt token on the choice. A request
with several prompts has one formatter per prompt (its choice `index`), sharing one `id`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
    index: int = 0                        # this prompt's choice index
    echo: str | None = None               # the prompt's text to send back first (None: no echo)
    prompt_logprobs: int | None = None    # vLLM's extension: None, or top N per prompt token
    is_special: Callable[[int], bool] = lambda token_id: False   # (no text of its own in `echo`)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""                          # set by the first event unless given
    _offset: int = 0
    _scoring: bool = False                # max_tokens 0: an analysis, nothing generated

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    # -- streaming ----------------------------------------------------------------------------
    def chunks(self, event: dict) -> list[dict]:
        """The SSE payloads one native event becomes (possibly none)."""
        kind = event["type"]
        if kind in ("start", "analysis"):
            self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + event["id"][4:]
            self._scoring = kind == "analysis"
            if self.kind == "completion":
                prompt = self._prompt_choice(event)
                if not (self.attention or prompt):
                    return []
                first = self._chunk([{**self._choice(text=""), **prompt}])
            else:
                first = self._chunk([self._choice(role=True)])
            if self.attention and kind == "start":
                first["prompt_tokens"] = event["prompt_tokens"]
                if "prompt_attention" in event:
                    first["prompt_attention"] = event["prompt_attention"]
            return [first]
        if kind == "token":
            return [self._chunk([self._choice(text=event["text"], tokens=[event])])]
        if kind == "done":
            out = [self._chunk([self._choice(text="", finish_reason=self._finish_reason(event))])]
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
            choice = {"index": self.index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": self.index, "text": text, "finish_reason": finish_reason}
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
            choice = {"index": self.index, "message": {"role": "assistant", "content": text},
                      "finish_reason": done["finish_reason"]}
        else:
            prompt = self._prompt_choice(start)
            choice = {"index": self.index, "text": prompt.get("text", "") + text,
                      "finish_reason": self._finish_reason(done)}
            if "prompt_logprobs" in prompt:
                choice["prompt_logprobs"] = prompt["prompt_logprobs"]
        if self.logprobs is not None:
            generated = self._logprobs(tokens)
            if self.kind == "completion" and "logprobs" in prompt:
                generated = {k: prompt["logprobs"][k] + generated[k] for k in generated}
            choice["logprobs"] = generated
        if self.attention:
            choice["tokens"] = [{"id": t["id"], "text": t["text"]} for t in tokens]
            choice["attention"] = [t["attention"] for t in tokens if "attention" in t]
        out = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice], "usage": done["usage"]}
        if self.attention and start["type"] == "start":
            out["prompt_tokens"] = start["prompt_tokens"]
            if "prompt_attention" in start:
                out["prompt_attention"] = start["prompt_attention"]
        return out

    def _finish_reason(self, done: dict) -> str:
        return "length" if self._scoring and done["finish_reason"] == "stop" else done["finish_reason"]

    def _prompt_choice(self, event: dict) -> dict:
        """What a completion's choice gets from its prompt (a start or analysis event): the echoed
        `text` and its `logprobs` (echo), and `prompt_logprobs` (vLLM's); {} when none is asked."""
        out = {}
        tokens = event["prompt_tokens"] if event["type"] == "start" else event["tokens"]
        if self.echo is not None:
            out["text"] = self.echo
            if self.logprobs is not None:
                offsets, at = [], 0
                for t in tokens:
                    offsets.append(at)
                    special = self.is_special(t["id"]) and not self.echo.startswith(t["text"], at)
                    at += 0 if special else len(t["text"])         # BOS has no text in the echo, unless sent
                lps = [None if t["logprob"] is None else _lp(t["logprob"]) for t in tokens]
                out["logprobs"] = {"tokens": [t["text"] for t in tokens], "token_logprobs": lps,
                                   "text_offset": offsets}
                if self.logprobs:
                    out["logprobs"]["top_logprobs"] = [
                        None if t["logprob"] is None else
                        {alt["text"]: _lp(alt["logprob"]) for alt in t["top_logprobs"][: self.logprobs]}
                        for t in tokens]
            self._offset = len(self.echo)                  # the completion's offsets follow the prompt
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [None if t["logprob"] is None else _vllm_entry(t, self.prompt_logprobs)
                                      for t in tokens]
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


def _vllm_entry(token: dict, n: int) -> dict:
    """vLLM's prompt_logprobs entry for one prompt token: the actual token and the top n, by id."""
    top = token.get("top_logprobs", [])[:n]
    ranks = {alt["id"]: rank for rank, alt in enumerate(top, 1)}
    out = {str(token["id"]): {"logprob": _lp(token["logprob"]), "rank": ranks.get(token["id"]),
                              "decoded_token": token["text"]}}
    for rank, alt in enumerate(top, 1):
        out.setdefault(str(alt["id"]), {"logprob": _lp(alt["logprob"]), "rank": rank, "decoded_token": alt["text"]})
    return out

"""Typed results: `Completion` (the server's `GenerateResponse`, plus helpers), `Analysis` (a
`/v1/analyze` answer, plus helpers) and the reading of an NDJSON event stream into typed events,
shared by the sync and async streams."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from clients.errors import StreamError, stream_error
from server.schemas import (
    AnalyzedToken,
    AnalyzeResponse,
    AttentionRows,
    DoneEvent,
    ErrorEvent,
    ErrorInfo,
    GeneratedToken,
    GenerateResponse,
    LensEntry,
    StartEvent,
    TokenEvent,
    TokenInfo,
    parse_stream_event,
)

Event = StartEvent | TokenEvent | DoneEvent


class Completion(GenerateResponse):
    """One finished generation: what `generate()` returns and what a stream folds into."""

    @classmethod
    def from_events(cls, start: StartEvent, tokens: list[TokenEvent], done: DoneEvent) -> Completion:
        """The response the server would have sent without streaming (as server/native.collect)."""
        return cls(id=start.id, model=start.model, text=done.text,
                   tokens=[GeneratedToken.model_validate(t.model_dump(exclude={"type", "index"}))
                           for t in tokens],
                   prompt_tokens=start.prompt_tokens, prompt_attention=start.prompt_attention,
                   finish_reason=done.finish_reason, usage=done.usage, timings=done.timings)

    def context(self, index: int) -> list[TokenInfo]:
        """The tokens generated token `index` attended over: the prompt, then the tokens before it
        (its `attention` row has one weight per token here)."""
        index = range(len(self.tokens))[index]
        return [*self.prompt_tokens, *(TokenInfo(id=t.id, text=t.text) for t in self.tokens[:index])]

    def attention_row(self, index: int = -1) -> AttentionRows:
        """[layer][head][key]: generated token `index`'s attention (needs `attention=` on the request)."""
        row = self.tokens[index].attention
        if row is None:
            raise ValueError("this completion has no attention: ask with attention=True (or an "
                             "AttentionRequest) on generate() or stream()")
        return row


class Analysis:
    """What the model made of a text (`analyze()`): `response` is the server's `AnalyzeResponse`;
    `attention(layer, head)` and `lens(layer)` pick one layer's numbers by the model's own layer and
    head indices, whichever were asked for."""

    def __init__(self, response: AnalyzeResponse, *, attention: dict | None):
        self.response = response
        self._attention = attention                     # what the request asked for

    def __repr__(self) -> str:
        return f"Analysis({self.response.model!r}, {len(self.tokens)} tokens)"

    @property
    def tokens(self) -> list[AnalyzedToken]:
        return self.response.tokens

    @property
    def logprobs(self) -> list[float | None]:
        """log p(token i | the tokens before it); None for the first."""
        return [t.logprob for t in self.response.tokens]

    @property
    def completion_logprob(self) -> float | None:
        return self.response.completion_logprob

    def attention(self, layer: int, head: int | str) -> list[list[float]]:
        """[q][k ≤ q]: where each position looked, in the model's `layer` and `head` (or "mean")."""
        if self.response.attention is None or self._attention is None:
            raise ValueError("this analysis has no attention: ask with attention=True (or an AttentionRequest)")
        layers, heads = self._attention.get("layers", "all"), self._attention.get("heads", "all")
        li = _index(layers, layer, "layer")
        if heads == "mean":
            if head != "mean":
                raise ValueError(f"only the mean over heads was asked for, not head {head}")
            return self.response.attention[li][0]
        if head == "mean":
            raise ValueError("the mean over heads was not asked for: ask with heads=\"mean\"")
        return self.response.attention[li][_index(heads, head, "head")]

    def lens(self, layer: int) -> list[list[LensEntry]]:
        """[q][k]: the logit lens after the model's `layer` at every position (the top k for q + 1)."""
        lens = self.response.logit_lens
        if lens is None:
            raise ValueError("this analysis has no logit lens: ask with logit_lens=True (or a LensRequest)")
        if layer < 0:                                  # from the end of the layers it has
            layer = lens.layers[layer]
        if layer not in lens.layers:
            raise ValueError(f"layer {layer} was not asked for; the lens has layers {lens.layers}")
        return lens.top[lens.layers.index(layer)]


def _index(asked: str | list[int], index: int, axis: str) -> int:
    """Where the model's `index` is in what was asked for ("all": everything, in order)."""
    if asked == "all":
        return index
    if index not in asked:
        raise ValueError(f"{axis} {index} was not asked for; the analysis has {axis}s {asked}")
    return asked.index(index)


class LineBuffer:
    """Bytes in, complete lines out. Splits on b"\\n" only: the server writes JSON with raw
    non-ASCII, and str.splitlines would also split on U+2028, U+0085 and friends inside a token."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        return [line for line in lines if line.strip()]

    def rest(self) -> bytes:
        """What followed the last newline (a complete stream ends with one, so normally b"")."""
        rest, self._pending = self._pending, b""
        return rest


class EventReader:
    """Checks and folds one stream's events: start, token..., done. An error event, an unreadable
    line, a line out of order or a stream that ends early raises `StreamError`."""

    def __init__(self) -> None:
        self.start: StartEvent | None = None
        self.tokens: list[TokenEvent] = []
        self.done: DoneEvent | None = None

    @property
    def finished(self) -> bool:
        return self.done is not None

    def accept(self, line: bytes) -> Event:
        try:
            event = parse_stream_event(line)
        except ValidationError as exc:
            raise _broken("invalid_event", f"unreadable stream line {line[:200]!r}: {exc}") from None
        if isinstance(event, ErrorEvent):
            raise stream_error(event.error, event.model_dump())
        expected = "start" if self.start is None else "token or done" if self.done is None else "nothing"
        if event.type not in expected.split(" or "):
            raise _broken("invalid_event", f"expected {expected}, got a {event.type} event")
        if isinstance(event, StartEvent):
            self.start = event
        elif isinstance(event, TokenEvent):
            self.tokens.append(event)
        else:
            self.done = event
        return event

    def end(self) -> None:
        """The bytes ran out: fine after `done`, else the stream was cut off."""
        if self.done is None:
            raise _broken("incomplete_stream", f"the stream ended without a done or error event "
                          f"after {len(self.tokens)} tokens" + ("" if self.start else " (and no start)"))

    def completion(self) -> Completion:
        if self.start is None or self.done is None:
            raise RuntimeError("the stream has not finished: iterate it to the end (or call until_done())")
        return Completion.from_events(self.start, self.tokens, self.done)


def _broken(error_type: str, message: str) -> StreamError:
    return stream_error(ErrorInfo(type=error_type, message=message))


def cut_off(exc: BaseException, reader: EventReader) -> StreamError:
    """A transport error after the stream started, as the StreamError it is."""
    error = _broken("incomplete_stream", f"the connection failed mid-stream after {len(reader.tokens)} "
                    f"tokens: {exc}")
    error.__cause__ = exc
    return error


def to_json(event: Any) -> str:
    """An event or result as compact JSON (None fields left out, as the server sends them)."""
    return event.model_dump_json(exclude_none=True)

"""`AsyncClient`: the asyncio client, on `httpx` — the same methods as `Client`, awaited."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Sequence
from dataclasses import replace
from typing import Any, Unpack

import httpx

from clients.errors import APIConnectionError, APITimeoutError, error_from_response
from clients.options import (
    NDJSON,
    AnalyzeOptions,
    GenerateOptions,
    Retry,
    Timeout,
    analyze_body,
    default_headers,
    detokenize_body,
    generate_body,
    resolve_api_key,
    resolve_url,
    tokenize_body,
)
from clients.results import Analysis, Completion, Event, EventReader, LineBuffer, cut_off
from server.schemas import AnalyzeResponse, DetokenizeResponse, ModelList, TokenizeResponse

# No response yet, so safe to send again (`Retry`): connect errors and timeouts, and a connection
# that dropped before a status line (httpx has a class for each).
NO_RESPONSE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
               httpx.RemoteProtocolError)


class AsyncClient:
    """attnserve over HTTP, for asyncio (arguments as `Client`'s; `http_client`: an
    `httpx.AsyncClient` of yours to send with, which you close).

        async with AsyncClient() as client:
            completion = await client.generate("two plus three equals", max_tokens=8)
            async with client.stream("two plus three equals") as stream:
                async for event in stream:
                    ...
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | float | tuple[float, float] | None = None, max_retries: int | None = None,
                 retry: Retry | None = None, http_client: httpx.AsyncClient | None = None):
        self.base_url = resolve_url(base_url)
        self.timeout = Timeout.of(timeout)
        self.retry = retry or Retry()
        if max_retries is not None:
            self.retry = replace(self.retry, max_retries=max_retries)
        self._owns_http = http_client is None  # a client given is the caller's to close
        self._http = http_client or httpx.AsyncClient()
        self._timeout = httpx.Timeout(connect=self.timeout.connect, read=self.timeout.read,
                                      write=self.timeout.read, pool=self.timeout.connect)
        self._headers = default_headers(resolve_api_key(api_key))

    def __repr__(self) -> str:
        return f"AsyncClient({self.base_url!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate and wait for the whole result (options: see `GenerateOptions`)."""
        body = generate_body(prompt, stream=False, **options)
        response = await self._send("POST", "/v1/generate", json=body)
        return Completion.model_validate_json(response.content)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> AsyncStream:
        """Generate, yielding events as they come (see `Client.stream`). Not a coroutine: use
        `async with client.stream(...) as s`, `async for e in client.stream(...)` or
        `s = await client.stream(...)`; the request is sent on the first of these."""
        body = generate_body(prompt, stream=True, **options)
        return AsyncStream(lambda reader: self._events(body, reader))

    async def _events(self, body: dict, reader: EventReader) -> AsyncGenerator[Event | None, None]:
        response = await self._send("POST", "/v1/generate", json=body, stream=True, headers={"Accept": NDJSON})
        try:
            yield None  # opened: the status was 200; from here on nothing is retried
            lines = LineBuffer()
            try:
                async for chunk in response.aiter_bytes():
                    for line in lines.feed(chunk):
                        yield reader.accept(line)
                        if reader.finished:
                            return
            except httpx.TransportError as exc:  # a reset, a bad chunk, the read timeout
                raise cut_off(exc, reader) from exc
            for line in lines.feed(lines.rest() + b"\n"):
                yield reader.accept(line)
            reader.end()
        finally:
            await response.aclose()

    async def analyze(self, text: str | None = None, **options: Unpack[AnalyzeOptions]) -> Analysis:
        """What the model makes of a text (or `ids`, or `prompt` + `completion`): each token's logprob,
        and with `attention=` / `logit_lens=` where it looked and what each layer predicted."""
        body = analyze_body(text, **options)
        response = await self._send("POST", "/v1/analyze", json=body)
        return Analysis(AnalyzeResponse.model_validate_json(response.content), attention=body.get("attention"))

    # -- tokenizer, models, operations -------------------------------------------------------------
    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> TokenizeResponse:
        """The prompt's tokens as `/v1/generate` sees them (with BOS unless add_special_tokens=False)."""
        body = tokenize_body(text, add_special_tokens=add_special_tokens)
        response = await self._send("POST", "/v1/tokenize", json=body)
        return TokenizeResponse.model_validate_json(response.content)

    async def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        response = await self._send("POST", "/v1/detokenize", json=detokenize_body(ids))
        return DetokenizeResponse.model_validate_json(response.content).text

    async def models(self) -> ModelList:
        """The served model (`data[0].id`, `data[0].max_context`)."""
        return ModelList.model_validate_json((await self._send("GET", "/v1/models")).content)

    async def health(self) -> bool:
        """True once the server is ready, False while it is starting (503); not retried."""
        response = await self._send("GET", "/health", retry=False, ok=(200, 503))
        return response.status_code == 200

    async def metrics_text(self) -> str:
        """The Prometheus metrics, as text."""
        return (await self._send("GET", "/metrics")).text

    # -- transport -----------------------------------------------------------------------------------
    async def _send(self, method: str, path: str, *, json: Any = None, stream: bool = False,
                    retry: bool = True, ok: tuple[int, ...] = (200,),
                    headers: dict[str, str] | None = None) -> httpx.Response:
        """One request with retries, until a status in `ok` (else the mapped APIError is raised).
        With stream=True the body is left unread (the caller closes the response)."""
        url = self.base_url + path
        request = self._http.build_request(method, url, json=json, headers={**self._headers, **(headers or {})},
                                           timeout=self._timeout)
        rule = self.retry if retry else replace(self.retry, max_retries=0)
        for attempt in itertools.count():
            try:
                response = await self._http.send(request, stream=True)
            except NO_RESPONSE as exc:
                if (wait := rule.after(attempt)) is None:
                    kind = APITimeoutError if isinstance(exc, httpx.ConnectTimeout) else APIConnectionError
                    raise kind(f"{method} {url} failed after {attempt + 1} attempt(s): {exc!r}") from exc
            except httpx.TimeoutException as exc:
                raise APITimeoutError(f"{method} {url}: no response within the read timeout of "
                                      f"{self.timeout.read} s") from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{method} {url} failed: {exc!r}") from exc
            else:
                if response.status_code in ok:
                    if not stream:
                        try:
                            await response.aread()
                        finally:
                            await response.aclose()
                    return response
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
                wait = rule.after(attempt, status=response.status_code, retry_after=response.headers.get("Retry-After"))
                if wait is None:
                    raise error_from_response(response.status_code, response.headers, content)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")


class AsyncStream(AsyncIterator[Event]):
    """The events of one streamed generation (see `Stream`). The request is sent by `async with`,
    `await`, or the first `async for` step; `aclose()` (or leaving the `async with` block, or
    dropping the stream) closes the connection, and the server cancels."""

    def __init__(self, open_events: Callable[[EventReader], AsyncGenerator[Event | None, None]]):
        self._reader = EventReader()
        self._events = open_events(self._reader)
        self._opened = False

    async def open(self) -> AsyncStream:
        """Send the request (once): a refusal raises here."""
        if not self._opened:
            self._opened = True
            await anext(self._events)
        return self

    def __await__(self) -> Generator[Any, None, AsyncStream]:
        return self.open().__await__()

    async def __aenter__(self) -> AsyncStream:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Event:
        await self.open()
        return await anext(self._events)  # type: ignore[return-value]  # None came only from open()

    async def aclose(self) -> None:
        await self._events.aclose()

    @property
    def completion(self) -> Completion:
        """The whole result; RuntimeError before the `DoneEvent` was read."""
        return self._reader.completion()

    async def until_done(self) -> Completion:
        async for _ in self:
            pass
        return self.completion

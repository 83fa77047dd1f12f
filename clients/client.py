"""`Client`: the synchronous client, on `requests` (one pooled Session per client)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import replace
from typing import Any, Unpack

import requests

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
# that dropped before a status line (requests raises ConnectionError for all of them).
NO_RESPONSE = requests.ConnectionError


class Client:
    """attnserve over HTTP, synchronously.

        with Client("http://127.0.0.1:8000") as client:
            print(client.generate("two plus three equals", max_tokens=8).text)   # " five"
            for event in client.stream("two plus three equals", temperature=0.8, top_p=0.9, seed=1):
                ...

    `base_url` defaults to ATTNSERVE_URL, then http://127.0.0.1:8000; `api_key` to ATTNSERVE_API_KEY.
    `timeout`: seconds, `(connect, read)` or a `Timeout`. `max_retries` (or a whole `Retry` policy):
    how often a connection error or a 429 / 503 is retried, honouring Retry-After. `session`: a
    `requests.Session` of yours to send with (you close it).
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: Timeout | float | tuple[float, float] | None = None, max_retries: int | None = None,
                 retry: Retry | None = None, session: requests.Session | None = None):
        self.base_url = resolve_url(base_url)
        self.timeout = Timeout.of(timeout)
        self.retry = retry or Retry()
        if max_retries is not None:
            self.retry = replace(self.retry, max_retries=max_retries)
        self._owns_session = session is None  # a session given is the caller's to close
        self._session = session or requests.Session()
        self._headers = default_headers(resolve_api_key(api_key))

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate and wait for the whole result (options: see `GenerateOptions`)."""
        body = generate_body(prompt, stream=False, **options)
        with self._send("POST", "/v1/generate", json=body) as response:
            return Completion.model_validate_json(response.content)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> Stream:
        """Generate, yielding a `StartEvent`, `TokenEvent`s and a `DoneEvent` as they come.

        The request is sent now: a refusal raises here. An error event raises `StreamError`. Stop
        iterating early (break, or leave a `with` block) and the connection is closed, so the server
        cancels the generation and frees its slot.
        """
        body = generate_body(prompt, stream=True, **options)
        return Stream(lambda reader: self._events(body, reader))

    def _events(self, body: dict, reader: EventReader) -> Generator[Event | None, None, None]:
        response = self._send("POST", "/v1/generate", json=body, stream=True, headers={"Accept": NDJSON})
        try:
            yield None  # opened: the status was 200; from here on nothing is retried
            lines = LineBuffer()
            try:
                for chunk in response.iter_content(chunk_size=None):
                    for line in lines.feed(chunk):
                        yield reader.accept(line)
                        if reader.finished:
                            return
            except requests.RequestException as exc:  # a reset, a bad chunk, the read timeout
                raise cut_off(exc, reader) from exc
            for line in lines.feed(lines.rest() + b"\n"):
                yield reader.accept(line)
            reader.end()
        finally:
            response.close()

    def analyze(self, text: str | None = None, **options: Unpack[AnalyzeOptions]) -> Analysis:
        """What the model makes of a text (or `ids`, or `prompt` + `completion`): each token's logprob,
        and with `attention=` / `logit_lens=` where it looked and what each layer predicted."""
        body = analyze_body(text, **options)
        with self._send("POST", "/v1/analyze", json=body) as response:
            return Analysis(AnalyzeResponse.model_validate_json(response.content), attention=body.get("attention"))

    # -- tokenizer, models, operations -------------------------------------------------------------
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> TokenizeResponse:
        """The prompt's tokens as `/v1/generate` sees them (with BOS unless add_special_tokens=False)."""
        body = tokenize_body(text, add_special_tokens=add_special_tokens)
        with self._send("POST", "/v1/tokenize", json=body) as response:
            return TokenizeResponse.model_validate_json(response.content)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        with self._send("POST", "/v1/detokenize", json=detokenize_body(ids)) as response:
            return DetokenizeResponse.model_validate_json(response.content).text

    def models(self) -> ModelList:
        """The served model (`data[0].id`, `data[0].max_context`)."""
        with self._send("GET", "/v1/models") as response:
            return ModelList.model_validate_json(response.content)

    def health(self) -> bool:
        """True once the server is ready, False while it is starting (503); not retried.
        Raises APIConnectionError when nothing answers."""
        with self._send("GET", "/health", retry=False, ok=(200, 503)) as response:
            return response.status_code == 200

    def metrics_text(self) -> str:
        """The Prometheus metrics, as text."""
        with self._send("GET", "/metrics") as response:
            return response.text

    # -- transport -----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, json: Any = None, stream: bool = False, retry: bool = True,
              ok: tuple[int, ...] = (200,), headers: dict[str, str] | None = None) -> requests.Response:
        """One request with retries, until a status in `ok` (else the mapped APIError is raised)."""
        url = self.base_url + path
        rule = self.retry if retry else replace(self.retry, max_retries=0)
        for attempt in itertools.count():
            try:
                response = self._session.request(method, url, json=json, stream=stream,
                                                 headers={**self._headers, **(headers or {})},
                                                 timeout=(self.timeout.connect, self.timeout.read))
            except NO_RESPONSE as exc:
                if (wait := rule.after(attempt)) is None:
                    kind = APITimeoutError if isinstance(exc, requests.ConnectTimeout) else APIConnectionError
                    raise kind(f"{method} {url} failed after {attempt + 1} attempt(s): {exc}") from exc
            except requests.Timeout as exc:
                raise APITimeoutError(f"{method} {url}: no response within the read timeout of "
                                      f"{self.timeout.read} s") from exc
            else:
                if response.status_code in ok:
                    return response
                wait = rule.after(attempt, status=response.status_code, retry_after=response.headers.get("Retry-After"))
                if wait is None:
                    error = error_from_response(response.status_code, response.headers, response.content)
                    response.close()
                    raise error
                response.close()
            time.sleep(wait)
        raise AssertionError("unreachable")


class Stream(Iterator[Event]):
    """The events of one streamed generation. Iterate it once; `completion` is the folded result
    after the `DoneEvent`, `until_done()` reads the rest and returns it. `close()` (or leaving a
    `with` block, or dropping the stream) closes the connection, and the server cancels."""

    def __init__(self, open_events: Callable[[EventReader], Generator[Event | None, None, None]]):
        self._reader = EventReader()
        self._events = open_events(self._reader)
        next(self._events)  # send the request: a refusal raises here

    def __next__(self) -> Event:
        return next(self._events)  # type: ignore[return-value]  # None came only from __init__'s next

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._events.close()

    @property
    def completion(self) -> Completion:
        """The whole result; RuntimeError before the `DoneEvent` was read."""
        return self._reader.completion()

    def until_done(self) -> Completion:
        for _ in self:
            pass
        return self.completion

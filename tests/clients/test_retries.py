"""Retries, timeouts and error mapping against a scripted HTTP server (tests/clients/fake_server.py):
what the real server cannot be made to do on demand."""

from __future__ import annotations

import asyncio
import time

import pytest

from clients import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    RateLimitError,
    Retry,
    ServerError,
    StreamError,
    Timeout,
    ValidationError,
)
from tests.clients.fake_server import COMPLETION, EVENTS, error, fake_server, hang_up, ndjson, reply, sleep
from tests.serving import free_port

FAST = Retry(max_retries=3, backoff=0.01, max_backoff=0.05)


def call(kind: str, url: str, method: str, *args, retry: Retry = FAST, timeout=None, **kwargs):
    if kind == "sync":
        with Client(url, retry=retry, timeout=timeout) as client:
            return getattr(client, method)(*args, **kwargs)

    async def run():
        async with AsyncClient(url, retry=retry, timeout=timeout) as client:
            return await getattr(client, method)(*args, **kwargs)
    return asyncio.run(run())


def stream(kind: str, url: str, *args, retry: Retry = FAST, **kwargs) -> list:
    """Every event of one stream (or the exception it raised)."""
    if kind == "sync":
        with Client(url, retry=retry) as client:
            return list(client.stream(*args, **kwargs))

    async def run():
        async with AsyncClient(url, retry=retry) as client:
            return [event async for event in client.stream(*args, **kwargs)]
    return asyncio.run(run())


def test_503_twice_then_ok(kind):
    unavailable = error(503, "overloaded", "busy", Retry_After="0")
    with fake_server(unavailable, unavailable, reply(200, COMPLETION)) as fake:
        assert call(kind, fake.url, "generate", "two plus three equals").text == " five"
    assert fake.attempts == 3
    assert all(r[:2] == ("POST", "/v1/generate") for r in fake.requests)
    assert fake.requests[0][3] == fake.requests[2][3]  # the same body each time


def test_429_waits_for_retry_after(kind):
    with fake_server(error(429, "overloaded", "at capacity", Retry_After="1"), reply(200, COMPLETION)) as fake:
        started = time.monotonic()
        call(kind, fake.url, "generate", "x", retry=Retry(max_retries=1, backoff=0.01))
        assert time.monotonic() - started >= 1.0
    assert fake.attempts == 2


def test_retries_run_out_into_the_mapped_error(kind):
    busy = error(429, "overloaded", "the server is at capacity", Retry_After="0")
    with fake_server(busy) as fake, pytest.raises(RateLimitError, match="the server is at capacity") as info:
        call(kind, fake.url, "generate", "x")
    assert fake.attempts == FAST.max_retries + 1
    assert (info.value.status, info.value.type, info.value.retry_after) == (429, "overloaded", 0.0)


@pytest.mark.parametrize("status", [500, 502, 504, 400, 401])
def test_other_statuses_are_not_retried(kind, status):
    with fake_server(error(status, "boom", "no"), reply(200, COMPLETION)) as fake, pytest.raises(Exception) as info:
        call(kind, fake.url, "generate", "x")
    assert fake.attempts == 1
    assert (info.value.status, info.value.type, info.value.message) == (status, "boom", "no")
    assert isinstance(info.value, ServerError) == (status >= 500)


def test_a_dropped_connection_is_retried(kind):
    with fake_server(hang_up, reply(200, COMPLETION)) as fake:
        assert call(kind, fake.url, "generate", "x").text == " five"
    assert fake.attempts == 2


def test_nothing_listening(kind):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(APIConnectionError, match="failed after 2 attempt"):
        call(kind, url, "models", retry=Retry(max_retries=1, backoff=0.01))


def test_a_read_timeout_is_not_retried(kind):
    with fake_server(sleep(1.0, reply(200, COMPLETION))) as fake, pytest.raises(APITimeoutError):
        call(kind, fake.url, "generate", "x", timeout=Timeout(connect=1.0, read=0.3))
    assert fake.attempts == 1


def test_a_stream_is_retried_until_it_starts(kind):
    with fake_server(error(503, "overloaded", "busy", Retry_After="0"), ndjson(EVENTS)) as fake:
        events = stream(kind, fake.url, "x")
    assert [e.type for e in events] == ["start", "token", "done"]
    assert fake.attempts == 2
    assert fake.requests[0][2]["Accept"] == "application/x-ndjson"


@pytest.mark.parametrize("chunked", [False, True], ids=["eof", "broken-chunk"])
def test_a_started_stream_is_never_retried(kind, chunked):
    cut_off = ndjson(EVENTS[:2], chunked=chunked, cut=True)
    with fake_server(cut_off, ndjson(EVENTS)) as fake, pytest.raises(StreamError) as info:
        stream(kind, fake.url, "x")
    assert fake.attempts == 1
    assert (info.value.status, info.value.type) == (200, "incomplete_stream")


def test_an_error_event_raises_stream_error(kind):
    failed = {"type": "error", "error": {"type": "timeout", "message": "ran past the limit"}}
    script = ndjson([EVENTS[0], EVENTS[1], failed])
    with fake_server(script) as fake, pytest.raises(StreamError, match="ran past the limit") as info:
        stream(kind, fake.url, "x")
    assert info.value.type == "timeout" and fake.attempts == 1


def test_events_out_of_order_raise(kind):
    with fake_server(ndjson([EVENTS[1], EVENTS[2]])) as fake, pytest.raises(StreamError, match="expected start"):
        stream(kind, fake.url, "x")


@pytest.mark.parametrize("options", [
    {"prompt": ""}, {"max_tokens": 0}, {"top_p": 1.5}, {"top_k": 3, "top_p": 0.5}, {"logprobs": 21},
    {"stop": ["."] * 9}, {"seed": -1}, {"attention": {"layers": "first"}},
    {"sampling": {"strategy": "top_p", "p": 0.9}, "temperature": 0.5},
])
def test_invalid_requests_are_refused_before_sending(kind, options):
    options = {"prompt": "x", **options}
    with fake_server(reply(200, COMPLETION)) as fake:
        with pytest.raises(ValidationError):
            call(kind, fake.url, "generate", options.pop("prompt"), **options)
        with pytest.raises(ValidationError):
            call(kind, fake.url, "detokenize", [-1])
    assert fake.attempts == 0


def test_api_key_is_sent_as_bearer(monkeypatch):
    with fake_server(reply(200, {"object": "list", "data": []})) as fake:
        Client(fake.url, api_key="k1").models()
        monkeypatch.setenv("ATTNSERVE_API_KEY", "k2")
        Client(fake.url).models()
        call("async", fake.url, "models")
    assert [r[2].get("Authorization") for r in fake.requests] == ["Bearer k1", "Bearer k2", "Bearer k2"]

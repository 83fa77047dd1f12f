"""Every client method, sync and async, against the real server (tests/clients/conftest.py)."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
import requests

from clients import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Completion,
    ContextLengthExceededError,
    DoneEvent,
    ModelList,
    Retry,
    StartEvent,
    TokenEvent,
    TokenizeResponse,
    TopPSampling,
)
from tests.clients.conftest import ANSWER, API_KEY, PROMPT, Caller

LONG = {"max_tokens": 500, "ignore_eos": True}  # a second or more: still running when we leave
RUNNING = re.compile(r'^attnserve_num_requests_running\{model_name="calculator"\} (\S+)$', re.M)


def running(metrics_text: str) -> float:
    return float(RUNNING.search(metrics_text).group(1))


def same_result(a: Completion, b: Completion) -> bool:
    return a.model_dump(exclude={"id", "timings"}) == b.model_dump(exclude={"id", "timings"})


def test_generate(api):
    completion = api("generate", PROMPT, max_tokens=8)
    assert isinstance(completion, Completion)
    assert completion.text == ANSWER and completion.finish_reason == "stop"
    assert completion.model == "calculator"
    assert [t.text for t in completion.prompt_tokens] == ["<|bos|>", "two", " plus", " three", " equals"]
    assert completion.usage.prompt_tokens == 5


def test_generate_options_reach_the_server(api):
    completion = api("generate", PROMPT, max_tokens=3, logprobs=2, attention={"heads": "mean"}, stop=["x"])
    first = completion.tokens[0]
    assert first.logprob is not None and len(first.top_logprobs) == 2
    n = len(completion.prompt_tokens)
    assert [len(row) for row in completion.prompt_attention[0][0]] == list(range(1, n + 1))  # ragged rows
    assert len(completion.prompt_attention[0]) == 1  # "mean": one head entry
    assert completion.attention_row(0)[0][0] == completion.prompt_attention[0][0][-1]
    assert len(completion.context(-1)) == len(completion.attention_row(-1)[0][0])


def test_sampling_keywords_equal_the_sampling_object(api):
    by_keywords = api("generate", "one plus", max_tokens=6, temperature=1.5, top_p=0.95, seed=11)
    by_object = api("generate", "one plus", max_tokens=6, sampling=TopPSampling(p=0.95, temperature=1.5), seed=11)
    assert same_result(by_keywords, by_object)


def test_stream_order_and_completion(api):
    events, completion = api.events(PROMPT, max_tokens=8, logprobs=0)
    assert isinstance(events[0], StartEvent) and isinstance(events[-1], DoneEvent)
    tokens = events[1:-1]
    assert all(isinstance(e, TokenEvent) for e in tokens)
    assert [e.index for e in tokens] == list(range(len(tokens)))
    assert "".join(e.text for e in tokens) == events[-1].text == ANSWER
    assert same_result(completion, api("generate", PROMPT, max_tokens=8, logprobs=0))


def test_tokenizer_models_and_operations(api):
    tokens = api("tokenize", PROMPT)
    assert isinstance(tokens, TokenizeResponse) and tokens.count == 5 and tokens.max_context == 512
    assert api("tokenize", PROMPT, add_special_tokens=False).count == 4
    assert api("detokenize", [t.id for t in tokens.tokens[1:]]) == PROMPT
    models = api("models")
    assert isinstance(models, ModelList) and models.data[0].id == "calculator"
    assert api("health") is True
    assert running(api("metrics_text")) == 0


def test_errors_carry_the_server_type_and_message(api):
    with pytest.raises(ContextLengthExceededError) as info:
        api("generate", "one " * 600)
    error = info.value
    assert (error.status, error.type) == (400, "context_length_exceeded")
    assert error.max_context == 512 and error.prompt_tokens > 512
    assert "the context holds at most 512" in error.message

    with pytest.raises(BadRequestError, match=r"attention\.layers must be indices") as info:
        api("generate", PROMPT, attention={"layers": [99]})
    assert (info.value.type, info.value.info.param) == ("invalid_request", "attention.layers")

    with pytest.raises(BadRequestError, match="vocabulary size") as info:
        api("detokenize", [100_000])
    assert info.value.type == "invalid_request"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_authentication_error(kind, api_server, key):
    with pytest.raises(AuthenticationError) as info:
        Caller(kind, api_server.url, api_key=key)("models")
    assert (info.value.status, info.value.type) == (401, "unauthorized")
    assert "a valid API key is required" in info.value.message
    assert Caller(kind, api_server.url, api_key=key)("health") is True  # never needs a key


def test_url_and_api_key_from_the_environment(kind, api_server, monkeypatch):
    monkeypatch.setenv("ATTNSERVE_URL", api_server.url)
    monkeypatch.setenv("ATTNSERVE_API_KEY", API_KEY)
    assert Caller(kind, None)("generate", PROMPT, max_tokens=4).text == ANSWER


def test_server_422_is_a_bad_request(api_server):
    """What the client would refuse itself, sent raw: FastAPI's 422 becomes a BadRequestError."""
    with Client(api_server.url, api_key=API_KEY) as client, pytest.raises(BadRequestError) as info:
        client._send("POST", "/v1/generate", json={"prompt": "", "max_tokens": 1})
    assert (info.value.status, info.value.type) == (422, "validation_error")
    assert info.value.message.startswith("prompt: String should have at least 1 character")


def wait_idle(client: Client, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while running(client.metrics_text()) != 0:
        assert time.monotonic() < deadline, f"the server still runs a request {timeout} s after the break"
        time.sleep(0.05)


def served_promptly(client: Client) -> None:
    """A new request gets the only slot at once (no retries: a slot still held would be a 429)."""
    started = time.monotonic()
    assert client.generate(PROMPT, max_tokens=4).text == ANSWER
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("how", ["break", "with", "close"])
def test_leaving_a_stream_early_frees_the_slot(api_server, how):
    with Client(api_server.url, api_key=API_KEY, max_retries=0) as client:
        if how == "break":
            for event in client.stream(PROMPT, **LONG):
                if isinstance(event, TokenEvent) and event.index == 2:
                    assert running(client.metrics_text()) == 1
                    break
        elif how == "with":
            with client.stream(PROMPT, **LONG) as stream:
                next(stream), next(stream)
        else:
            stream = client.stream(PROMPT, **LONG)
            next(stream)
            stream.close()
        wait_idle(client)
        served_promptly(client)


@pytest.mark.parametrize("how", ["break", "async with"])
def test_leaving_an_async_stream_early_frees_the_slot(api_server, how):
    async def run():
        async with AsyncClient(api_server.url, api_key=API_KEY, max_retries=0) as client:
            if how == "break":
                async for event in client.stream(PROMPT, **LONG):
                    if isinstance(event, TokenEvent) and event.index == 2:
                        break
            else:
                async with client.stream(PROMPT, **LONG) as stream:
                    await anext(stream), await anext(stream)
            deadline = time.monotonic() + 3.0
            while running(await client.metrics_text()) != 0:
                assert time.monotonic() < deadline, "the server still runs the request 3 s after the break"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            assert (await client.generate(PROMPT, max_tokens=4)).text == ANSWER
            assert time.monotonic() - started < 2.0
    asyncio.run(run())


def test_real_429_is_retried_after_retry_after(api_server):
    """The only slot is taken: the server answers 429 with Retry-After: 1; the client waits that
    long and gets in once the holder leaves."""
    statuses: list[int] = []
    session = requests.Session()
    session.hooks["response"].append(lambda response, **_: statuses.append(response.status_code))
    with Client(api_server.url, api_key=API_KEY) as holder_client, \
            Client(api_server.url, api_key=API_KEY, session=session, retry=Retry(max_retries=4)) as client:
        holder = holder_client.stream(PROMPT, **LONG)
        next(holder)
        threading.Timer(0.5, holder.close).start()
        started = time.monotonic()
        assert client.generate(PROMPT, max_tokens=4).text == ANSWER
        assert time.monotonic() - started >= 1.0
    assert statuses[0] == 429 and statuses[-1] == 200


def test_until_done_and_awaiting_a_stream(api_server):
    with Client(api_server.url, api_key=API_KEY) as client:
        stream = client.stream(PROMPT)
        assert isinstance(next(stream), StartEvent)
        assert stream.until_done().text == ANSWER

    async def run():
        async with AsyncClient(api_server.url, api_key=API_KEY) as client:
            stream = await client.stream(PROMPT)  # sent now: a refusal would raise here
            return await stream.until_done()
    assert asyncio.run(run()).text == ANSWER


def test_analyze_returns_the_servers_numbers_with_helpers(api, api_server):
    analysis = api("analyze", PROMPT + ANSWER, attention={"layers": [1, 3], "heads": [0, 2]}, logprobs=2,
                   logit_lens={"layers": [0, 3], "top_k": 2})
    raw = requests.post(f"{api_server.url}/v1/analyze", headers={"X-API-Key": API_KEY}, timeout=30, json={
        "text": PROMPT + ANSWER, "attention": {"layers": [1, 3], "heads": [0, 2]}, "logprobs": 2,
        "logit_lens": {"layers": [0, 3], "top_k": 2}}).json()
    assert [t.text for t in analysis.tokens] == ["<|bos|>", "two", " plus", " three", " equals", " five"]
    assert analysis.logprobs[0] is None and analysis.logprobs[1:] == [t["logprob"] for t in raw["tokens"][1:]]
    # The helpers index by the model's own layer and head numbers, whichever were asked for.
    assert analysis.attention(3, 2) == raw["attention"][1][1] and analysis.attention(1, 0) == raw["attention"][0][0]
    assert [[e.model_dump() for e in row] for row in analysis.lens(3)] == raw["logit_lens"]["top"][1]
    assert analysis.lens(-1) == analysis.lens(3) and analysis.lens(3)[4][0].text == ANSWER
    with pytest.raises(ValueError, match="layer 2 was not asked for"):
        analysis.attention(2, 0)
    with pytest.raises(ValueError, match="head 1 was not asked for"):
        analysis.attention(1, 1)
    with pytest.raises(ValueError, match="layer 1 was not asked for"):
        analysis.lens(1)


def test_analyze_scores_a_completion(api):
    scored = api("analyze", prompt=PROMPT, completion=ANSWER)
    assert scored.completion_logprob == pytest.approx(scored.logprobs[-1]) and scored.completion_logprob < 0
    with pytest.raises(ValueError, match="no logit lens"):
        scored.lens(0)

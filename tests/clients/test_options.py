"""The client's pure parts: sampling keywords (kept equal to the server's OpenAI mapping), retry
waits, settings from the environment, NDJSON line splitting, error mapping and the heatmap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    GreedySampling,
    RandomSampling,
    RateLimitError,
    Retry,
    ServerError,
    Timeout,
    TopKSampling,
    TopPSampling,
    TypicalSampling,
    ValidationError,
    sampling_from,
)
from clients.errors import error_from_response
from clients.heatmap import bar, heatmap, pick, visible
from clients.options import generate_body, resolve_api_key, resolve_url
from clients.results import LineBuffer
from server.schemas import CompletionRequest

KNOBS = ("temperature", "top_k", "top_p", "min_p", "typical_p")


@pytest.mark.parametrize(("keywords", "expected"), [
    ({}, GreedySampling()),
    ({"temperature": 0}, GreedySampling()),
    ({"temperature": 0, "top_p": 0.5, "top_k": 3}, GreedySampling()),  # temperature 0 wins, as OpenAI
    ({"temperature": 0.7}, RandomSampling(temperature=0.7)),
    ({"top_k": 5}, TopKSampling(k=5, temperature=1.0)),
    ({"temperature": 0.8, "top_p": 0.9}, TopPSampling(p=0.9, temperature=0.8)),
    ({"typical_p": 0.5, "top_p": 1.0, "top_k": 0}, TypicalSampling(p=0.5)),  # the others are off
    ({"temperature": 50.0}, RandomSampling(temperature=50.0)),  # native range, beyond OpenAI's 2
])
def test_sampling_keywords(keywords, expected):
    assert sampling_from(**keywords) == expected


def test_conflicts_and_ranges_are_validation_errors():
    with pytest.raises(ValidationError, match="top_k and min_p cannot be combined"):
        sampling_from(top_k=3, min_p=0.1)
    with pytest.raises(ValidationError, match="not both"):
        sampling_from(TopPSampling(p=0.5), temperature=0.5)
    with pytest.raises(ValidationError):
        sampling_from(top_p=0.0)
    assert isinstance(ValidationError, type) and issubclass(ValidationError, ValueError)


knob = {"temperature": st.one_of(st.just(0.0), st.just(1e-7), st.floats(0, 2)),
        "top_k": st.one_of(st.none(), st.integers(-1, 50)),
        "top_p": st.one_of(st.none(), st.just(1.0), st.floats(0.01, 1)),
        "min_p": st.one_of(st.none(), st.just(0.0), st.floats(0, 0.99)),
        "typical_p": st.one_of(st.none(), st.just(1.0), st.floats(0.01, 1))}


@given(st.fixed_dictionaries({}, optional=knob))
def test_keywords_map_as_the_servers_openai_route(keywords):
    """Given any keyword (the one difference: none given, or all None, is greedy here and random at
    temperature 1 for OpenAI), the client picks the strategy `/v1/completions` picks, and refuses
    what it refuses."""
    try:
        server = CompletionRequest(prompt="x", **keywords).sampling_params()
    except ValidationError:
        with pytest.raises(ValidationError):
            sampling_from(**keywords)
        return
    ours = sampling_from(**keywords).params()
    if any(v is not None for v in keywords.values()):
        assert ours == {k: server[k] for k in ours}
    else:
        assert ours["strategy"] == "greedy"


def test_generate_body():
    body = generate_body("hi", stream=True, max_tokens=3, stop="\n", attention=True, temperature=0.5)
    assert body == {"prompt": "hi", "max_tokens": 3, "stream": True, "stop": ["\n"],
                    "sampling": {"strategy": "random", "temperature": 0.5}, "repetition_penalty": 1.0,
                    "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False,
                    "attention": {"layers": "all", "heads": "all", "include_prompt": True}}
    with pytest.raises(TypeError):
        generate_body("hi", stream=False, max_new_tokens=3)  # a typo is not silently dropped


def test_retry_waits():
    retry = Retry(backoff=0.5, max_backoff=4.0, max_retry_after=10.0)
    assert retry.wait(0, "2") == 2.0 and retry.wait(5, "0") == 0.0
    assert 0.25 <= retry.wait(0) <= 0.5 and 2.0 <= retry.wait(10) <= 4.0
    assert retry.wait(0, "120") <= 0.5  # past max_retry_after: our own backoff
    assert 0 <= retry.wait(0, "Wed, 21 Oct 2015 07:28:00 GMT") <= 0.5  # a date in the past: now
    assert Timeout.of(3) == Timeout(3, 3) and Timeout.of((1, 9)) == Timeout(1, 9)


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNSERVE_URL", "http://example:9000/")
    monkeypatch.setenv("ATTNSERVE_API_KEY", "from-env")
    assert resolve_url(None) == "http://example:9000" and resolve_url("localhost:1") == "http://localhost:1"
    assert resolve_api_key(None) == "from-env" and resolve_api_key("arg") == "arg"
    monkeypatch.setenv("ATTNSERVE_API_KEY", "")
    assert resolve_api_key(None) is None


def test_lines_split_on_newline_only():
    lines = LineBuffer()
    token = json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False).encode()
    assert lines.feed(token[:3]) == []
    assert lines.feed(token[3:] + b"\n{}\n\n{") == [token, b"{}"]
    assert lines.rest() == b"{"


@pytest.mark.parametrize(("status", "body", "cls", "error_type"), [
    (400, {"error": {"type": "context_length_exceeded", "message": "m", "prompt_tokens": 9, "max_context": 4}},
     ContextLengthExceededError, "context_length_exceeded"),
    (401, {"error": {"type": "unauthorized", "message": "m"}}, AuthenticationError, "unauthorized"),
    (422, {"detail": [{"loc": ["body", "sampling", "p"], "msg": "m"}]}, BadRequestError, "validation_error"),
    (413, {"detail": "m"}, BadRequestError, "http_error"),
    (429, {"error": {"type": "overloaded", "message": "m"}}, RateLimitError, "overloaded"),
    (503, "m", ServerError, "http_error"),
    (499, {"error": {"type": "cancelled", "message": "m"}}, APIError, "cancelled"),
])
def test_error_mapping(status, body, cls, error_type):
    content = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    error = error_from_response(status, {"Retry-After": "3"}, content)
    assert type(error) is cls and error.type == error_type and error.status == status
    assert error.message == ("sampling.p: m" if status == 422 else "m")
    if cls is ContextLengthExceededError:
        assert (error.prompt_tokens, error.max_context) == (9, 4)
    if cls is RateLimitError:
        assert error.retry_after == 3.0


def test_heatmap():
    assert visible(" a\tb\n") == "␣a⇥b↵" and visible("") == "∅" and visible("x" * 20, 5) == "xxxx…"
    assert bar(1.0, 1.0, 4) == "████" and bar(0.5, 1.0, 4) == "██  " and bar(0.3, 1.0, 4) == "█░  "
    assert bar(0.45, 1.0, 4) == "█▓  "
    assert bar(0.0, 1.0, 3) == "   "
    text = heatmap(["<s>", " two"], [0.25, 0.75], width=4)
    assert text.splitlines() == ["0 <s>  █░   0.250", "1 ␣two ████ 0.750"]
    rows = [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]  # [layer][head][key]
    assert pick(pick(rows, "mean"), "mean") == [0.5, 0.5] and pick(pick(rows, -1), 0) == [0.5, 0.5]


def test_importing_clients_pulls_no_torch_or_litserve():
    code = ("import sys, clients, clients.__main__; "
            "print(sorted(m for m in ('torch', 'litserve', 'fastapi', 'uvicorn', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

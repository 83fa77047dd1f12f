"""Refusals: real status codes, before any byte of a stream, with messages naming the problem."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serving import running_server

pytestmark = pytest.mark.slow
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A server with an API key, a 16-token context, one slot and no waiting room."""
    with running_server(tmp_path_factory.mktemp("strict"), "--api-key", KEY, "--max-context", "16",
                        "--max-batch", "1", "--max-queue", "0") as srv:
        yield srv


def post(srv, path, body, key: str | None = KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(srv.url + path, json=body, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "two", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "two", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "two", "sampling": {"strategy": "top_k", "k": 0}}, "k"),
    ({"prompt": "two", "sampling": {"strategy": "top_p", "p": 1.5}}, "p"),
    ({"prompt": "two", "sampling": {"strategy": "beam"}}, "strategy"),
    ({"prompt": "two", "stop": ["a"] * 9}, "stop"),
    ({"prompt": "two", "logprobs": 21}, "logprobs"),
    ({"prompt": "two", "attention": {"heads": "max"}}, "heads"),
    ({"prompt": "two", "temprature": 0.5}, "temprature"),
])
def test_schema_violations_are_422_naming_the_field(strict, body, field):
    for stream in (False, True):
        r = post(strict, "/v1/generate", body | {"stream": stream})
        assert r.status_code == 422, r.text
        assert any(field in ".".join(map(str, d["loc"])) + d["msg"] for d in r.json()["detail"]), r.text


def test_non_json_nan_and_invalid_utf8_bodies_are_4xx(strict):
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for raw in (b"{not json", b'{"prompt": "two", "sampling": {"strategy": "random", "temperature": NaN}}',
                b'{"prompt": "two", "repetition_penalty": Infinity}'):
        r = requests.post(strict.url + "/v1/generate", data=raw, headers=headers, timeout=10)
        assert r.status_code == 422, (raw[:80], r.text)
    for raw in (b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000):   # not UTF-8; nested too deep
        r = requests.post(strict.url + "/v1/generate", data=raw, headers=headers, timeout=10)
        assert r.status_code == 400 and "parsing the body" in r.text, raw[:20]


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_400_before_the_stream(strict, stream):
    prompt = "two plus three" * 10
    n = post(strict, "/v1/tokenize", {"text": prompt}).json()["count"]
    r = post(strict, "/v1/generate", {"prompt": prompt, "stream": stream}, stream=True)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["type"] == "context_length_exceeded" and error["max_context"] == 16
    assert error["prompt_tokens"] == n > 16 and "16" in error["message"] and str(n) in error["message"]


def test_prompt_of_exactly_max_context_is_served(strict):
    prompt = "two" + " two" * 14                              # BOS + 15 words = 16 tokens
    r = post(strict, "/v1/generate", {"prompt": prompt, "max_tokens": 50, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 16
    assert r.json()["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 1
    too_long = post(strict, "/v1/generate", {"prompt": prompt + " two"})
    assert too_long.status_code == 400 and too_long.json()["error"]["prompt_tokens"] == 17


def test_attention_layer_out_of_range_and_oversized_payload_are_400(strict):
    r = post(strict, "/v1/generate", {"prompt": "two", "attention": {"layers": [4]}})
    assert r.status_code == 400 and "attention.layers" in r.json()["error"]["message"]
    r = post(strict, "/v1/generate", {"prompt": "two", "attention": {"heads": [9]}})
    assert r.status_code == 400 and "attention.heads" in r.json()["error"]["message"]


def test_api_key_is_required_on_generation_and_tokenizer_routes(strict):
    for path, body in (("/v1/generate", {"prompt": "two"}), ("/v1/completions", {"prompt": "two"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "two"}]}),
                       ("/v1/tokenize", {"text": "two"}), ("/v1/detokenize", {"ids": [1]})):
        for key in (None, "wrong-key"):
            r = post(strict, path, body, key=key)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", (path, key)
        assert post(strict, path, body).status_code == 200, path
    assert requests.get(strict.url + "/v1/models", timeout=10).status_code == 401
    ok = requests.get(strict.url + "/v1/models", headers={"X-API-Key": KEY}, timeout=10)
    assert ok.status_code == 200
    assert requests.get(strict.url + "/health", timeout=10).status_code == 200       # open
    assert requests.get(strict.url + "/metrics", timeout=10).status_code == 200      # open
    assert KEY not in strict.logs()                                                   # never logged


def test_overload_is_429_with_retry_after_and_admitted_requests_finish(tmp_path):
    """One slot and one place in the queue: a third request is refused at once; the two admitted finish."""
    with running_server(tmp_path, "--max-batch", "1", "--max-queue", "1") as srv:
        body = {"prompt": "two", "max_tokens": 500, "ignore_eos": True, "stream": True}
        # ~16 MB of attention rows, read only after the checks: this request holds its slot however
        # fast the engine is (the server's writes wait for a reader).
        every_weight = {"layers": "all", "heads": "all", "include_prompt": False}
        running = post(srv, "/v1/generate", body | {"attention": every_weight}, key=None, stream=True)
        lines = running.iter_lines()
        assert json.loads(next(lines))["type"] == "start"        # the only slot is taken
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, srv, "/v1/generate", body | {"stream": False, "max_tokens": 5}, None)
            time.sleep(0.3)                                       # let it reach the queue
            started = time.monotonic()
            refused = post(srv, "/v1/generate", body, key=None)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "overloaded" and time.monotonic() - started < 2
            events = [json.loads(line) for line in lines if line]
            assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500
            assert waiting.result().status_code == 200 and waiting.result().json()["usage"]["completion_tokens"] == 5
        assert post(srv, "/v1/generate", {"prompt": "two"}, key=None).status_code == 200   # capacity is back

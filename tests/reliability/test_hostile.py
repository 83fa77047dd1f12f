"""Hostile input on every route: answered with a 4xx that names the problem, never a 5xx, and the
server keeps serving. (tests/server/test_errors.py has the per-field 422s, NaN/inf, invalid UTF-8
and deep nesting on /v1/generate, and the context limit of /v1/generate.)"""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.reliability.probes import metric, raw_request, scrape
from tests.serving import running_server

pytestmark = pytest.mark.slow
CONTEXT, BODY_LIMIT, ATTENTION_LIMIT = 32, 65_536, 2_000
CHAT = {"messages": [{"role": "user", "content": "two plus three"}]}
ROUTES = {"/v1/generate": {"prompt": "two"}, "/v1/completions": {"prompt": "two"}, "/v1/chat/completions": CHAT,
          "/v1/tokenize": {"text": "two"}, "/v1/detokenize": {"ids": [3]}}
GENERATION = ["/v1/generate", "/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hostile"), "--max-context", str(CONTEXT), "--max-body-bytes",
                        str(BODY_LIMIT), "--max-attention-floats", str(ATTENTION_LIMIT)) as server:
        yield server
        assert "Traceback" not in server.logs(), server.logs()[-3000:]      # nothing crashed, anywhere


def post(srv, path: str, body, **kw) -> requests.Response:
    return requests.post(srv.url + path, json=body, timeout=30, **kw)


def max_tokens_field(path: str) -> str:
    return "max_completion_tokens" if path == "/v1/chat/completions" else "max_tokens"


def assert_still_serving(srv) -> None:
    r = post(srv, "/v1/generate", {"prompt": "two plus three equals"})
    assert r.status_code == 200 and r.json()["text"] == " five"


# -- huge bodies --------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_whether_sized_or_chunked(srv):
    big = {"prompt": "two " * BODY_LIMIT, "stream": True}
    sized = post(srv, "/v1/generate", big)

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    chunked = requests.post(srv.url + "/v1/completions", data=chunks(), timeout=30,
                            headers={"content-type": "application/json"})           # no Content-Length
    for r in (sized, chunked):
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", r.text
    assert_still_serving(srv)


def test_a_gigabyte_body_is_refused_without_reading_it(srv):
    """Announce 1 GB, send 128 KiB: the answer is 413 at once, not after the server read it all."""
    sock = raw_request(srv.url, "POST", "/v1/generate", headers={"Content-Length": str(2**30)})
    started = time.monotonic()
    with sock:
        sock.sendall(b'{"prompt": "' + b"a" * 131_072)
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert time.monotonic() - started < 5
    assert_still_serving(srv)


# -- malformed JSON on every route --------------------------------------------------------------
HOSTILE_BODIES = {
    "invalid UTF-8": b'{"prompt": "\xff\xfe", "text": "\xc3\x28", "messages": "\xed\xa0\x80"}',
    "lone surrogate escapes": b'{"prompt": "\\ud800", "text": "\\udfff", "ids": ["\\ud800"], '
                              b'"messages": [{"role": "user", "content": "\\ud83d"}], "\\udc00": 1}',
    "nested 20000 deep": b"[" * 20_000 + b"]" * 20_000,
    "NaN and Infinity": b'{"prompt": "two", "text": "two", "ids": [NaN], "temperature": Infinity, '
                        b'"messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
    "5000-digit integer": b'{"prompt": "two", "max_tokens": ' + b"9" * 5000 + b"}",
    "1e400": b'{"prompt": "two", "text": "two", "ids": [1e400], "max_tokens": 1e400}',
    "not an object": b'["two"]',
    "null": b"null",
    "empty": b"",
    "truncated": b'{"prompt": "tw',
}


@pytest.mark.parametrize("path", list(ROUTES))
def test_malformed_bodies_are_4xx_with_a_json_error_on_every_route(srv, path):
    for name, raw in HOSTILE_BODIES.items():
        r = requests.post(srv.url + path, data=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code in (400, 422), (name, r.status_code, r.text[:300])
        body = r.json()
        assert ("error" in body) if r.status_code == 400 else ("detail" in body), (name, body)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = requests.post(srv.url + path, data=json.dumps(ROUTES[path]), headers={"content-type": content_type},
                          timeout=30)
        assert r.status_code == 422, (content_type, r.text[:300])
    assert_still_serving(srv)


# -- max_tokens and stop strings ----------------------------------------------------------------
@pytest.mark.parametrize("path", GENERATION)
def test_out_of_range_max_tokens_and_thousands_of_stop_strings_are_422(srv, path):
    base, field = ROUTES[path], max_tokens_field(path)
    for bad in ({field: -1}, {field: 0}, {field: -(2**63)}, {field: 1_000_001}, {field: 2**64}, {field: 1e300},
                {"stop": ["a"] * 5000}, {"stop": [str(i) for i in range(9)]}, {"stop": "x" * 10_000},
                {"stop": [""]}):
        for stream in (False, True):
            r = post(srv, path, base | bad | {"stream": stream})
            assert r.status_code == 422, (bad if len(str(bad)) < 100 else list(bad), r.text[:200])
            assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("path", GENERATION)
def test_a_million_max_tokens_is_served_and_ends_with_length_at_the_context_end(srv, path):
    body = ROUTES[path] | {max_tokens_field(path): 1_000_000, "ignore_eos": True}
    r = post(srv, path, body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    finish = r.json()["finish_reason"] if path == "/v1/generate" else r.json()["choices"][0]["finish_reason"]
    assert finish == "length" and usage["total_tokens"] == CONTEXT + 1, usage  # the last token needs no slot
    r = post(srv, path, body | {"stream": True}, stream=True)
    assert r.status_code == 200
    lines = [line for line in r.iter_lines() if line]
    if path == "/v1/generate":
        assert json.loads(lines[-1])["finish_reason"] == "length"
    else:
        assert lines[-1] == b"data: [DONE]" and b'"finish_reason":"length"' in b"".join(lines)


# -- context: exactly the limit and one more, through the OpenAI routes --------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_completion_prompt_of_exactly_the_context_is_served_and_one_more_is_400(srv, stream):
    prompt = "two" + " two" * (CONTEXT - 2)                                   # BOS + CONTEXT - 1 words
    assert post(srv, "/v1/tokenize", {"text": prompt}).json()["count"] == CONTEXT
    r = post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 100, "ignore_eos": True, "stream": stream},
             stream=True)
    assert r.status_code == 200
    text = r.text
    assert '"finish_reason":"length"' in text.replace(" ", ""), text[:500]
    r = post(srv, "/v1/completions", {"prompt": prompt + " two", "stream": stream}, stream=True)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"     # not a stream
    assert r.json()["error"] | {"message": ""} == {"type": "context_length_exceeded", "message": "",
                                                  "prompt_tokens": CONTEXT + 1, "max_context": CONTEXT}


# -- attention payloads -------------------------------------------------------------------------
def count_floats(value) -> int:
    return sum(map(count_floats, value)) if isinstance(value, list) else 1


@pytest.mark.parametrize("path", GENERATION)
def test_oversized_attention_is_refused_up_front_with_its_size(srv, path):
    """All layers and heads of a prompt and a million tokens: refused before any work, stream or not."""
    attention = {"layers": "all", "heads": "all", "include_prompt": True}
    before = metric(scrape(srv.url), "attnserve_generation_tokens_total")
    for stream in (False, True):
        started = time.monotonic()
        r = post(srv, path, ROUTES[path] | {max_tokens_field(path): 1_000_000, "attention": attention,
                                            "stream": stream}, stream=True)
        assert time.monotonic() - started < 2
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text[:200]
        error = r.json()["error"]
        assert error["type"] == "attention_payload_too_large" and error["limit"] == ATTENTION_LIMIT
        assert error["floats"] > ATTENTION_LIMIT and str(error["floats"]) in error["message"]
    assert metric(scrape(srv.url), "attnserve_generation_tokens_total") == before       # nothing generated


def test_the_attention_size_check_counts_exactly_what_would_be_sent(srv):
    """The up-front estimate is the number of floats the response really holds: a request one
    float over the limit is refused, one at the limit is served."""
    body = {"prompt": "two plus three", "max_tokens": 6, "ignore_eos": True,
            "attention": {"layers": [0, 2], "heads": "all", "include_prompt": True}}
    r = post(srv, "/v1/generate", body)
    assert r.status_code == 200, r.text
    sent = count_floats(r.json()["prompt_attention"]) + sum(count_floats(t["attention"]) for t in r.json()["tokens"])
    assert sent <= ATTENTION_LIMIT
    over = post(srv, "/v1/generate", body | {"max_tokens": 200})
    assert over.status_code == 400
    estimate = over.json()["error"]["floats"]
    generated = CONTEXT - r.json()["usage"]["prompt_tokens"] + 1          # max_tokens 200 → the context end
    n = r.json()["usage"]["prompt_tokens"]
    assert estimate == 2 * 4 * (n * (n + 1) // 2 + generated * n + generated * (generated - 1) // 2)
    assert sent == 2 * 4 * (n * (n + 1) // 2 + 6 * n + 6 * 5 // 2)       # the same formula, as served

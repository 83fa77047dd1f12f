"""/v1/completions as evaluation harnesses use it: echo + logprobs (the prompt scored by the same
teacher-forced prefill as /v1/analyze), max_tokens 0, prompt lists and token-id prompts, vLLM's
prompt_logprobs, and their refusals."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from server.schemas import MAX_PROMPTS
from tests.serving import running_server

pytestmark = pytest.mark.slow

TEXT = "forty two minus seven equals thirty five"
PROBLEMS = ["two plus three equals", "ninety one plus ninety seven equals", "forty two minus seven equals",
            "eleven minus twelve equals", "zero plus zero equals"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path: str = "/v1/completions", **body) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=60)


def analyzed(server, text: str, logprobs: int = 0) -> list[dict]:
    r = post(server, "/v1/analyze", text=text, logprobs=logprobs)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def close(a: list, b: list, tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or abs(x - y) <= tol for x, y in zip(a, b))


def test_echo_with_logprobs_equals_analyze_and_the_sdk_parses_it(server, client):
    c = client.completions.create(model="calculator", prompt=TEXT, max_tokens=1, logprobs=2, echo=True,
                                  temperature=0)
    choice, tokens = c.choices[0], analyzed(server, TEXT, logprobs=2)
    lp, n = choice.logprobs, len(tokens)
    assert choice.text.startswith(TEXT) and len(lp.tokens) == n + 1          # the prompt, then one generated
    assert lp.tokens[:n] == [t["text"] for t in tokens]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert close(lp.token_logprobs[:n], [t["logprob"] for t in tokens])
    for top, t in zip(lp.top_logprobs[1:n], tokens[1:]):
        assert top == pytest.approx({a["text"]: a["logprob"] for a in t["top_logprobs"]}, abs=1e-5)
    # offsets into the text: BOS has no text of its own; the generated token follows the prompt
    assert [choice.text[o: o + len(tok)] for o, tok in zip(lp.text_offset[1:n], lp.tokens[1:n])] == lp.tokens[1:n]
    assert lp.text_offset[n] == len(TEXT)
    assert c.usage.prompt_tokens == n and c.usage.completion_tokens == 1


def test_max_tokens_0_with_echo_scores_without_generating(server, client):
    c = client.completions.create(model="calculator", prompt=TEXT, max_tokens=0, logprobs=0, echo=True)
    choice, tokens = c.choices[0], analyzed(server, TEXT)
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert close(choice.logprobs.token_logprobs, [t["logprob"] for t in tokens])
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(tokens), 0)


def test_echo_streams_the_prompt_first(server):
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
        "prompt": PROBLEMS[0], "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 0, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == PROBLEMS[0] and first["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROBLEMS[0] + " five"


def test_batched_and_token_id_prompts_give_the_one_by_one_choices(server):
    one_by_one = [post(server, prompt=p, max_tokens=6, temperature=0, logprobs=2).json()["choices"][0]
                  for p in PROBLEMS]
    batched = post(server, prompt=PROBLEMS, max_tokens=6, temperature=0, logprobs=2).json()
    ids = [[t["id"] for t in post(server, "/v1/tokenize", text=p).json()["tokens"]] for p in PROBLEMS]
    by_ids = post(server, prompt=ids, max_tokens=6, temperature=0, logprobs=2).json()
    single_ids = post(server, prompt=ids[1], max_tokens=6, temperature=0, logprobs=2).json()
    for response in (batched, by_ids):
        assert [c["index"] for c in response["choices"]] == list(range(len(PROBLEMS)))
        for got, want in zip(response["choices"], one_by_one):
            assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
            assert close(got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"], 1e-4)
        assert response["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in one_by_one)
    assert single_ids["choices"][0]["text"] == one_by_one[1]["text"]


def test_several_prompts_stream_interleaved_by_index(server):
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
        "prompt": PROBLEMS, "max_tokens": 6, "temperature": 0, "stream": True, "echo": True,
        "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != b"data: [DONE]"]
    texts = {i: "" for i in range(len(PROBLEMS))}
    for c in chunks[:-1]:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    want = [post(server, prompt=p, max_tokens=6, temperature=0).json()["choices"][0]["text"] for p in PROBLEMS]
    assert [texts[i] for i in range(len(PROBLEMS))] == [p + w for p, w in zip(PROBLEMS, want)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


def test_vllm_prompt_logprobs(server):
    choice = post(server, prompt=TEXT, max_tokens=1, temperature=0, prompt_logprobs=2).json()["choices"][0]
    tokens = analyzed(server, TEXT, logprobs=2)
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(tokens)
    for entry, t in zip(choice["prompt_logprobs"][1:], tokens[1:]):
        assert entry[str(t["id"])]["logprob"] == pytest.approx(t["logprob"], abs=1e-5)
        assert entry[str(t["id"])]["decoded_token"] == t["text"]
        for rank, alt in enumerate(t["top_logprobs"], 1):
            assert entry[str(alt["id"])]["rank"] == rank
    assert "logprobs" not in choice or choice["logprobs"] is None


@pytest.mark.parametrize("body, status, error, param", [
    ({"prompt": [[1, 5], [7, 100000]]}, 400, "invalid_request", "prompt[1]"),
    ({"prompt": [1, -3]}, 400, "invalid_request", "prompt"),
    ({"prompt": ["two"] * (MAX_PROMPTS + 1)}, 422, None, None),
    ({"prompt": []}, 422, None, None),
    ({"prompt": "two", "max_tokens": 0}, 422, None, None),                       # 0 needs echo
    ({"prompt": ["two", "two " * 40], "echo": True, "logprobs": 1, "max_tokens": 0}, 400,
     "context_length_exceeded", None),
    ({"prompt": "two", "n": 2}, 422, None, None),
])
def test_refusals(limited, body, status, error, param):
    r = post(limited, **body)
    assert r.status_code == status, r.text
    if error is not None:
        assert r.json()["error"]["type"] == error
    if param is not None:
        assert r.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("limited"), "--max-context", "32") as srv:
        yield srv


def test_a_text_prompt_that_starts_with_bos_text_reads_it_as_bos(server):
    """What a harness sends when it decodes BOS-prefixed token ids: no second BOS, same scores."""
    plain = post(server, prompt=TEXT, max_tokens=0, echo=True, logprobs=0).json()["choices"][0]
    prefixed = post(server, prompt="<|bos|>" + TEXT, max_tokens=0, echo=True, logprobs=0).json()["choices"][0]
    assert prefixed["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert close(prefixed["logprobs"]["token_logprobs"], plain["logprobs"]["token_logprobs"])
    assert prefixed["text"] == "<|bos|>" + TEXT and prefixed["logprobs"]["text_offset"][:2] == [0, 7]


def test_scoring_streams_the_prompt_then_the_end(server):
    r = requests.post(server.url + "/v1/completions", stream=True, timeout=60, json={
        "prompt": [TEXT, PROBLEMS[0]], "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True})
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for index, prompt in enumerate([TEXT, PROBLEMS[0]]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["text"] == prompt and mine[0]["logprobs"]["token_logprobs"][0] is None
        assert [c["finish_reason"] for c in mine] == [None, "length"]

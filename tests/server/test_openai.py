"""The OpenAI-compatible endpoints, read by the unmodified `openai` SDK."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_completion(client):
    c = client.completions.create(model="calculator", prompt="two plus three equals", max_tokens=8, temperature=0)
    assert c.choices[0].text == " five" and c.choices[0].finish_reason == "stop"
    assert c.object == "text_completion" and c.model == "calculator"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (5, 2, 7)


def test_completion_length_and_logprobs(client):
    c = client.completions.create(model="calculator", prompt="ninety one plus ninety seven equals", max_tokens=2,
                                  temperature=0, logprobs=2)
    assert c.choices[0].finish_reason == "length" and c.choices[0].text == " one hundred"
    lp = c.choices[0].logprobs
    assert lp.tokens == [" one", " hundred"] and len(lp.token_logprobs) == 2 and lp.text_offset == [0, 4]
    assert all(len(alternatives) == 2 for alternatives in lp.top_logprobs)


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(model="calculator", prompt="forty two minus seven equals", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == " thirty five"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3   # " thirty", " five", EOS


def test_chat(client):
    c = client.chat.completions.create(model="calculator", messages=[{"role": "user", "content": "two plus two"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    choice = c.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and c.object == "chat.completion"
    assert len(choice.logprobs.content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_chat_stream(client):
    stream = client.chat.completions.create(model="calculator", messages=[{"role": "user", "content": "two"}],
                                            max_tokens=4, stream=True, seed=3, temperature=0.9,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4 and len(deltas) > 0


def test_sse_wire_format(server):
    with requests.post(server.url + "/v1/completions", json={"prompt": "two plus three equals", "stream": True,
                                                             "temperature": 0}, stream=True, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_openai_sampling_knobs_map_to_strategies(server):
    body = {"prompt": "two plus", "max_tokens": 10, "seed": 5, "ignore_eos": True}
    for knobs in ({"temperature": 1.5}, {"temperature": 1.5, "top_k": 4}, {"temperature": 1.5, "top_p": 0.8},
                  {"temperature": 1.5, "min_p": 0.1}, {"temperature": 1.5, "typical_p": 0.8}):
        a, b = (requests.post(server.url + "/v1/completions", json=body | knobs, timeout=30).json() for _ in range(2))
        assert a["choices"][0]["text"] == b["choices"][0]["text"], knobs
    both = requests.post(server.url + "/v1/completions", json=body | {"top_k": 4, "top_p": 0.8}, timeout=30)
    assert both.status_code == 422 and "top_k" in both.text and "top_p" in both.text

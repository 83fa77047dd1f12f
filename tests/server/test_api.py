"""The native API of API.md against the real server: every endpoint and field."""

from __future__ import annotations

import json

import pytest
import requests
import torch

from model.checkpoint import load_checkpoint
from model.engine import Engine
from model.events import AttentionSpec, GenerationRequest, Token
from model.sampling import SamplingParams
from server.schemas import GenerateResponse, ModelList, TokenizeResponse, parse_stream_event
from tests.serving import CHECKPOINT

pytestmark = pytest.mark.slow


def post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=60, **kw)


def stream_events(server, body: dict) -> list[dict]:
    with post(server, "/v1/generate", {**body, "stream": True}, stream=True) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in r.iter_lines() if line]


def test_generate_answers_the_calculator(server):
    r = post(server, "/v1/generate", {"prompt": "two plus three equals", "max_tokens": 8})
    assert r.status_code == 200
    body = GenerateResponse.model_validate(r.json())
    assert body.text == " five" and body.finish_reason == "stop"
    assert body.model == "calculator" and body.id.startswith("gen-")
    assert [t.text for t in body.prompt_tokens] == ["<|bos|>", "two", " plus", " three", " equals"]
    assert body.usage.prompt_tokens == 5 and body.usage.total_tokens == 5 + body.usage.completion_tokens
    assert body.timings.total_ms >= body.timings.ttft_ms >= body.timings.queue_ms >= 0
    # optional parts are absent unless asked for
    raw = r.json()
    assert "prompt_attention" not in raw and all(set(t) == {"id", "text"} for t in raw["tokens"])


def test_stream_event_order_and_terminal_event(server):
    events = stream_events(server, {"prompt": "forty two minus seven equals", "max_tokens": 10, "logprobs": 2})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    for e in events:
        parse_stream_event(json.dumps(e))                     # every line matches its schema
    tokens = events[1:-1]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == events[-1]["text"] == " thirty five"
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)
    assert tokens[0]["top_logprobs"][0]["id"] == tokens[0]["id"]      # greedy: the best is chosen


def test_sampling_strategies_seeds_and_stops(server):
    strategies = [{"strategy": "random", "temperature": 1.5}, {"strategy": "top_k", "k": 5, "temperature": 2.0},
                  {"strategy": "top_p", "p": 0.9, "temperature": 2.0},
                  {"strategy": "min_p", "p": 0.05, "temperature": 2.0},
                  {"strategy": "typical", "p": 0.9, "temperature": 2.0}]
    for sampling in strategies:
        body = {"prompt": "two plus", "max_tokens": 12, "sampling": sampling, "seed": 7, "ignore_eos": True}
        first, second = (post(server, "/v1/generate", body).json() for _ in range(2))
        assert first["text"] == second["text"] and first["usage"]["completion_tokens"] == 12, sampling
    stopped = post(server, "/v1/generate", {"prompt": "ninety one plus ninety seven equals", "stop": ["d eig"]}).json()
    assert stopped["text"] == " one hundre" and stopped["finish_reason"] == "stop"


def test_penalties_and_ignore_eos(server):
    body = {"prompt": "two plus three equals", "max_tokens": 20, "ignore_eos": True}
    plain = post(server, "/v1/generate", body).json()
    assert plain["usage"]["completion_tokens"] == 20 and plain["finish_reason"] == "length"
    assert plain["text"].startswith(" five")                  # then past the end-of-sequence token
    penalised = post(server, "/v1/generate", body | {"repetition_penalty": 10.0, "frequency_penalty": 2.0}).json()
    assert penalised["text"].startswith(" five") and penalised["text"] != plain["text"]


def engine_reference(prompt: str, max_tokens: int, spec: AttentionSpec) -> list[Token]:
    model, tokenizer = load_checkpoint(CHECKPOINT)
    engine = Engine(model, tokenizer, max_batch=1)
    request = GenerationRequest(prompt_ids=tokenizer.encode(prompt), max_tokens=max_tokens, attention=spec,
                                sampling=SamplingParams(strategy="top_k", k=3, temperature=1.0), seed=11)
    return [e for e in engine.generate(request) if isinstance(e, Token)]


@pytest.mark.parametrize("heads", ["all", "mean", [1, 0]])
def test_attention_payload_shapes_causality_and_values(server, heads):
    body = {"prompt": "two plus three equals", "max_tokens": 3, "seed": 11,
            "sampling": {"strategy": "top_k", "k": 3, "temperature": 1.0},
            "attention": {"layers": [3, 1], "heads": heads, "include_prompt": True}}
    events = stream_events(server, body)
    start, tokens = events[0], events[1:-1]
    n_heads = {"all": 4, "mean": 1}.get(heads) if isinstance(heads, str) else len(heads)
    prompt = start["prompt_attention"]
    n = len(start["prompt_tokens"])
    assert len(prompt) == 2 and all(len(layer) == n_heads for layer in prompt)
    for layer in prompt:
        for head in layer:
            assert [len(row) for row in head] == [q + 1 for q in range(n)]       # ragged causal rows
            assert all(abs(sum(row) - 1) < 1e-3 for row in head)
    reference = engine_reference(body["prompt"], 3, AttentionSpec(
        layers=(3, 1), heads=heads if isinstance(heads, str) else tuple(heads)))
    assert [t["id"] for t in tokens] == [t.id for t in reference]                # same seed, same tokens
    for i, (got, ref) in enumerate(zip(tokens, reference)):
        att = torch.tensor(got["attention"], dtype=torch.float64)  # (layers, heads, keys)
        assert att.shape == (2, n_heads, n + i)
        assert torch.allclose(att, ref.attention.double(), atol=1e-5)
        assert torch.allclose(att.sum(-1), torch.ones(2, n_heads, dtype=att.dtype), atol=1e-3)
    assert tokens[0]["attention"] == [[head[-1] for head in layer] for layer in prompt]   # token 0 = last prompt row


def test_non_streaming_attention_and_no_prompt_attention(server):
    r = post(server, "/v1/generate", {"prompt": "two plus three equals", "max_tokens": 2,
                                      "attention": {"heads": "mean", "include_prompt": False}})
    body = r.json()
    assert "prompt_attention" not in body
    assert all(len(t["attention"]) == 4 and len(t["attention"][0]) == 1 for t in body["tokens"])


def test_models_tokenize_detokenize_health(server):
    models = ModelList.model_validate(requests.get(server.url + "/v1/models", timeout=10).json())
    assert [m.id for m in models.data] == ["calculator"] and models.data[0].max_context == 512
    tok = TokenizeResponse.model_validate(post(server, "/v1/tokenize", {"text": "two plus naïve 🙂"}).json())
    assert tok.count == len(tok.tokens) and tok.max_context == 512 and tok.tokens[0].text == "<|bos|>"
    ids = [t.id for t in tok.tokens]
    assert post(server, "/v1/detokenize", {"ids": ids}).json() == {"text": "two plus naïve 🙂"}
    no_bos = post(server, "/v1/tokenize", {"text": "two", "add_special_tokens": False}).json()
    assert no_bos["count"] == 1
    health = requests.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.text == "ok"


def test_openapi_documents_every_endpoint_request_and_event(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tokenize",
                 "/v1/detokenize"):
        assert path in spec["paths"], path
    assert "/internal/generate" not in spec["paths"]
    schemas = spec["components"]["schemas"]
    for name in ("GenerateRequest", "GenerateResponse", "StartEvent", "TokenEvent", "DoneEvent", "ErrorEvent",
                 "StreamEvent", "CompletionRequest", "CompletionChunk", "ChatCompletionRequest",
                 "ChatCompletionChunk", "TokenizeRequest", "ErrorResponse"):
        assert name in schemas, name


def test_internal_route_is_not_reachable(server):
    r = post(server, "/internal/generate", {"prompt_ids": [1, 2], "max_tokens": 1})
    assert r.status_code in (404, 405)


def test_viewer_page_is_served(server):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]

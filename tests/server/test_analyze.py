"""`POST /v1/analyze` over real HTTP: the numbers equal `transformers`' on the shipped weights, the
same inside a busy batch as alone, the same as the logit lens streamed with a generation; bad input
is refused with its status; a client that leaves is cancelled."""

from __future__ import annotations

import json
import time

import pytest
import requests
import torch

from tests.reliability.probes import metric, raw_request, scrape, wait_until
from tests.serving import CHECKPOINT, running_server

pytestmark = pytest.mark.slow
TEXT = "forty two minus seven equals thirty five"
EVERYTHING = {"attention": {"layers": "all", "heads": "all"}, "logprobs": 3,
              "logit_lens": {"layers": "all", "top_k": 3}}


def max_difference(a, b) -> float:
    """The largest difference between two nested lists of numbers (or of lens entries, whose ids
    must be equal), of the same shape."""
    if isinstance(a, dict):
        assert a["id"] == b["id"]
        return abs(a["prob"] - b["prob"])
    if isinstance(a, list):
        assert len(a) == len(b)
        return max((max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    return abs(a - b)


def analyze(server, **body) -> dict:
    r = requests.post(f"{server.url}/v1/analyze", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(CHECKPOINT, attn_implementation="eager")
    return model.eval()


def test_analyze_equals_transformers_on_the_shipped_weights(server, hf):
    got = analyze(server, text=TEXT, **EVERYTHING)
    ids = [t["id"] for t in got["tokens"]]
    n = len(ids)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    logprobs = out.logits[0].log_softmax(-1)                                      # (n, V)
    assert got["tokens"][0]["logprob"] is None and got["usage"] == {"prompt_tokens": n, "total_tokens": n}
    for i in range(1, n):
        token = got["tokens"][i]
        assert abs(token["logprob"] - logprobs[i - 1, ids[i]].item()) < 1e-4
        top = logprobs[i - 1].topk(3)
        assert [t["id"] for t in token["top_logprobs"]] == top.indices.tolist()
    for layer, heads in enumerate(got["attention"]):                              # [layer][head][q][k ≤ q]
        expected = out.attentions[layer][0]                                        # (H, n, n)
        for head, rows in enumerate(heads):
            assert [len(row) for row in rows] == list(range(1, n + 1))
            for q, row in enumerate(rows):
                assert max(abs(a - b) for a, b in zip(row, expected[head, q, : q + 1].tolist())) < 1e-4
    lens = got["logit_lens"]
    assert lens["layers"] == list(range(hf.config.num_hidden_layers))
    for index, layer in enumerate(lens["layers"]):
        h = out.hidden_states[layer + 1][0]                                        # after layer ℓ
        # HF's last hidden state is already normed: there the lens is the model's logits.
        logits = out.logits[0] if layer == lens["layers"][-1] else hf.lm_head(hf.model.norm(h))
        probs = logits.softmax(-1)
        for q in range(n):
            expected = probs[q].topk(3)
            assert [e["id"] for e in lens["top"][index][q]] == expected.indices.tolist()
            assert max(abs(e["prob"] - p) for e, p in zip(lens["top"][index][q], expected.values.tolist())) < 1e-4


def test_prompt_and_completion_score_the_completion(server):
    scored = analyze(server, prompt="forty two minus seven equals", completion=" thirty five")
    whole = analyze(server, text=TEXT)
    assert [t["id"] for t in scored["tokens"]] == [t["id"] for t in whole["tokens"]]
    prompt_tokens = requests.post(f"{server.url}/v1/tokenize", json={"text": "forty two minus seven equals"},
                                  timeout=10).json()["count"]
    expected = sum(t["logprob"] for t in whole["tokens"][prompt_tokens:])
    assert abs(scored["completion_logprob"] - expected) < 1e-5
    assert "completion_logprob" not in whole


def test_analyze_inside_a_busy_decode_batch_equals_alone(tmp_path):
    with running_server(tmp_path, "--max-batch", "8", "--decode-step", "python") as srv:   # (busy long enough)
        alone = analyze(srv, text=TEXT, **EVERYTHING)
        busy = [requests.post(f"{srv.url}/v1/generate", json={"prompt": "two plus", "max_tokens": 100_000,
                                                             "ignore_eos": True, "stream": True},
                              stream=True, timeout=30) for _ in range(6)]
        try:
            assert metric(scrape(srv.url), "attnserve_num_requests_running") == 6
            for _ in range(3):
                together = analyze(srv, text=TEXT, **EVERYTHING)
                assert [t["id"] for t in together["tokens"]] == [t["id"] for t in alone["tokens"]]
                for a, b in zip(together["tokens"][1:], alone["tokens"][1:]):
                    assert abs(a["logprob"] - b["logprob"]) < 1e-5
                assert max_difference(together["attention"], alone["attention"]) <= 2e-5
                assert max_difference(together["logit_lens"]["top"], alone["logit_lens"]["top"]) <= 1e-5
        finally:
            for r in busy:
                r.close()


def test_the_lens_streamed_with_a_generation_matches_analyze_on_its_text(server):
    body = {"prompt": "ninety one plus eight equals", "max_tokens": 8, "stream": True,
            "logit_lens": {"layers": [0, 2, 3], "top_k": 3, "include_prompt": True}}
    with requests.post(f"{server.url}/v1/generate", json=body, stream=True, timeout=60) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    start, tokens = events[0], [e for e in events if e["type"] == "token"]
    prompt_ids = [t["id"] for t in start["prompt_tokens"]]
    n = len(prompt_ids)
    got = analyze(server, ids=prompt_ids + [t["id"] for t in tokens], logit_lens={"layers": [0, 2, 3], "top_k": 3})
    top = got["logit_lens"]["top"]                                                # [layer][q][k]

    def close(a: list[dict], b: list[dict]) -> bool:
        return [e["id"] for e in a] == [e["id"] for e in b] and all(
            abs(x["prob"] - y["prob"]) < 1e-4 for x, y in zip(a, b))
    for i, token in enumerate(tokens):            # token i was produced at position n - 1 + i
        assert all(close(token["logit_lens"][j], top[j][n - 1 + i]) for j in range(3)), i
        assert token["logit_lens"][-1][0]["id"] == token["id"]                  # greedy: the last layer's top
    for j in range(3):
        assert all(close(start["prompt_logit_lens"][j][q], top[j][q]) for q in range(n))


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"text": ""}, 422, "string_too_short"),
    ({"text": "two", "ids": [1, 2]}, 422, "exactly one of"),
    ({"prompt": "two plus"}, 422, "go together"),
    ({"text": "two", "logprobs": 21}, 422, "less_than_equal"),
    ({"text": "two", "logit_lens": {"top_k": 0}}, 422, "greater_than_equal"),
    ({"text": "two " * 600}, 400, "context_length_exceeded"),
    ({"ids": [1, 10**6]}, 400, "ids must be token ids"),
    ({"text": "two", "logit_lens": {"layers": [4]}}, 400, "logit_lens.layers must be indices in [0, 4)"),
    ({"text": "two", "attention": {"heads": [9]}}, 400, "attention.heads must be indices in [0, 4)"),
    ({"text": "two plus two", "attention": {}, "logit_lens": {}}, 400, "attention_payload_too_large"),
])
def test_bad_analyze_requests_are_refused_naming_the_field(limited, body, status, error):
    r = requests.post(f"{limited.url}/v1/analyze", json=body, timeout=10)
    assert r.status_code == status and error in r.text, r.text


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server whose attention limit (100 numbers) "two plus two" with everything exceeds."""
    with running_server(tmp_path_factory.mktemp("analyze-limits"), "--max-attention-floats", "100") as srv:
        yield srv


def test_an_analyze_whose_client_leaves_is_cancelled(tmp_path):
    # --decode-step python: the generation holding the only slot must outlast the steps below (the
    # fused step makes its 510 tokens in ~0.1 s)
    with running_server(tmp_path, "--max-batch", "1", "--decode-step", "python") as srv:
        (card,) = requests.get(f"{srv.url}/v1/models", timeout=10).json()["data"]
        assert card["weights"]["decode_step"] == "the layers in PyTorch"
        slot = requests.post(f"{srv.url}/v1/generate", stream=True, timeout=30,
                             json={"prompt": "two", "max_tokens": 100_000, "ignore_eos": True, "stream": True})
        try:
            before = scrape(srv.url)
            sock = raw_request(srv.url, "POST", "/v1/analyze", json.dumps({"text": TEXT}).encode())
            wait_until(lambda: metric(scrape(srv.url), "attnserve_num_requests_waiting") == 1, timeout=10,
                       what="the analysis waiting for the only slot")
            sock.close()                                       # the client goes away while it waits
            wait_until(lambda: metric(scrape(srv.url), "attnserve_num_requests_waiting") == 0, timeout=10,
                       what="the analysis gone from the queue")
            after = scrape(srv.url)
            assert (metric(after, "attnserve_request_errors_total", type="cancelled")
                    == metric(before, "attnserve_request_errors_total", type="cancelled") + 1)
            assert metric(after, "attnserve_prompt_tokens_total") == metric(before, "attnserve_prompt_tokens_total")
        finally:
            slot.close()
        time.sleep(0.2)
        assert analyze(srv, text="two plus two equals four")["tokens"][-1]["text"] == " four"

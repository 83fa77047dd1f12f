"""Every shipped model in one server: `model` picks one, an unknown name is a 404 before any stream
byte, requests to both models share one busy server and get what each model gives alone, and every
metric keeps its model's name."""

from __future__ import annotations

import concurrent.futures
import json

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import ROOT, running_server

pytestmark = pytest.mark.slow

SHIPPED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "config.json").is_file())
PROMPTS = {"calculator": ["two plus three equals", "forty two minus seven equals", "ninety one plus eight equals"],
           "pronouns": ["the trophy did not fit in the suitcase because it was too big . it refers to the",
                        "the trophy did not fit in the suitcase because it was too small . it refers to the"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default server: every shipped checkpoint."""
    with running_server(tmp_path_factory.mktemp("models"), "--max-batch", "8", shipped=True) as srv:
        yield srv


def generate(server, model: str | None, prompt: str, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 6, **({"model": model} if model else {}), **extra}
    r = requests.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_shipped_model_is_listed_with_its_context(server):
    assert {"calculator", "pronouns"} <= set(SHIPPED)
    listed = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == SHIPPED
    for card in listed:
        config = json.loads((ROOT / "checkpoints" / card["id"] / "config.json").read_text())
        assert card["max_context"] == config["max_position_embeddings"]
        assert card["examples"], card                      # the viewer's one-click examples


def test_model_picks_the_engine_and_the_first_is_the_default(server):
    default = generate(server, None, PROMPTS["calculator"][0])
    assert default["model"] == SHIPPED[0] == "calculator" and default["text"] == " five"
    answer = generate(server, "pronouns", PROMPTS["pronouns"][0])
    assert answer["model"] == "pronouns" and answer["text"].startswith(" trophy")
    # The two tokenizers differ: each model's own vocabulary answers /v1/tokenize.
    counts = {m: requests.post(f"{server.url}/v1/tokenize", json={"text": PROMPTS["pronouns"][0], "model": m},
                               timeout=10).json()["count"] for m in SHIPPED}
    assert counts["pronouns"] < counts["calculator"]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/tokenize"])
def test_an_unknown_model_is_404_before_any_stream_byte(server, path):
    body = {"model": "no-such-model", "stream": True, "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "two"}]} if "chat" in path else {"prompt": "two"}
    if path == "/v1/tokenize":
        body = {"model": "no-such-model", "text": "two"}
    r = requests.post(server.url + path, json=body, timeout=10)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["model"]) == ("model_not_found", "model_not_found", "no-such-model")
    assert all(name in error["message"] for name in SHIPPED)


def test_both_models_interleaved_in_one_busy_server_give_what_each_gives_alone(server):
    jobs = [(model, prompt) for model in ("calculator", "pronouns") for prompt in PROMPTS[model]]
    alone = {job: generate(server, *job, logprobs=1)["tokens"] for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        # Each request twice, all at once, so steps of both engines run while the other is busy.
        together = list(pool.map(lambda job: (job, generate(server, *job, logprobs=1)["tokens"]), jobs * 2))
    for job, tokens in together:
        assert [t["id"] for t in tokens] == [t["id"] for t in alone[job]], job
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(tokens, alone[job])), job


def test_metrics_are_labelled_per_model(server):
    for model in SHIPPED:
        generate(server, model, PROMPTS[model][0])
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    generated = {s.labels["model_name"]: s.value for family in text_string_to_metric_families(text)
                 for s in family.samples if s.name == "attnserve_generation_tokens_total"}
    assert set(generated) == set(SHIPPED) and all(v > 0 for v in generated.values())


def test_the_openai_sdk_lists_both_models_and_completes_with_each(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == SHIPPED
    for model in SHIPPED:
        c = client.completions.create(model=model, prompt=PROMPTS[model][0], max_tokens=4, temperature=0)
        assert c.model == model and c.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="two", max_tokens=1)

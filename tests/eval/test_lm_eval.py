"""lm-evaluation-harness, unmodified, against a real server: its `local-completions` model over
/v1/completions with the task files beside this test (a loglikelihood and a generate_until task
over a slice of the calculator's held-out problems), token-id and text requests, offline.

Its numbers must be ours: loglikelihood accuracy within one problem of `model.eval`'s greedy exact
match on the same problems, and each summed logprob equal to /v1/analyze's completion_logprob."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from model.checkpoint import load_checkpoint
from model.data import Problem, calculator_split
from model.eval import held_out_accuracy
from tests.serving import CHECKPOINT, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EVAL_DIR = Path(__file__).parent
DATA = EVAL_DIR / "calculator_held_out.jsonl"
TASKS = ["calculator_loglikelihood", "calculator_generate"]


def docs() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def test_the_task_data_is_a_slice_of_the_held_out_problems():
    held_out = calculator_split()[2]
    assert docs() == [{"prompt": p.prompt, "completion": p.completion} for p in held_out[::13][:100]]


@pytest.fixture(scope="module")
def eval_correct() -> int:
    """How many of the task's problems `model.eval` answers right (greedy, exact match)."""
    model, tokenizer = load_checkpoint(CHECKPOINT)
    by_text = {p.prompt: p for p in calculator_split()[2]}
    problems: list[Problem] = [by_text[d["prompt"]] for d in docs()]
    _, wrong = held_out_accuracy(model, tokenizer, problems)
    return len(problems) - len(wrong)


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_unmodified_agrees_with_model_eval_and_analyze(server, eval_correct, tokenized, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")                      # never the network
    monkeypatch.chdir(ROOT)                                # the task files name their data from here
    model_args = (f"base_url={server.url}/v1/completions,model=calculator,tokenizer={CHECKPOINT},"
                  f"tokenizer_backend=huggingface,tokenized_requests={tokenized},add_bos_token=True,"
                  "num_concurrent=1,max_retries=1")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=TASKS,
                                      task_manager=TaskManager(include_path=str(EVAL_DIR)), batch_size=16,
                                      log_samples=True)
    n = len(docs())
    scores = results["results"]
    ll_correct = round(scores["calculator_loglikelihood"]["acc,none"] * n)
    generated_correct = round(scores["calculator_generate"]["exact_match,none"] * n)
    assert abs(ll_correct - eval_correct) <= 1, (ll_correct, eval_correct)
    assert abs(generated_correct - eval_correct) <= 1, (generated_correct, eval_correct)

    samples = results["samples"]["calculator_loglikelihood"]
    assert len(samples) == n
    for sample in samples:
        doc, (logprob, _greedy) = sample["doc"], sample["resps"][0][0]
        r = requests.post(f"{server.url}/v1/analyze", json={"prompt": doc["prompt"], "completion": doc["completion"]},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert logprob == pytest.approx(r.json()["completion_logprob"], abs=1e-4), doc

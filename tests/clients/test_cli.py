"""`python -m clients` end to end: a subprocess against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from server.schemas import parse_stream_event
from tests.clients.conftest import ANSWER, API_KEY, PROMPT
from tests.serving import ROOT


def cli(*args: str, url: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTNSERVE_URL": url, "PYTHONIOENCODING": "utf-8"}
    env.pop("ATTNSERVE_API_KEY", None)
    if key is not None:
        env["ATTNSERVE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "clients", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=60)


def test_generate_prints_the_text(api_server):
    out = cli("generate", PROMPT, "--max-tokens", "8", url=api_server.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ANSWER + "\n"
    assert out.stderr.startswith("[stop · 2 tokens")


def test_generate_with_attention_prints_a_heatmap(api_server):
    out = cli("generate", PROMPT, "--attention", "--layer", "1", "--head", "mean", url=api_server.url)
    assert out.returncode == 0, out.stderr
    text, blank, title, *rows = out.stdout.splitlines()
    assert (text, blank) == (ANSWER, "")
    assert title == "attention of token 0 (␣five) over its 5 context tokens, layer 1, mean of heads:"
    assert [row.split()[1] for row in rows] == ["<|bos|>", "two", "␣plus", "␣three", "␣equals"]
    weights = [float(row.split()[-1]) for row in rows]
    assert abs(sum(weights) - 1) < 0.01
    assert any(c in out.stdout for c in "░▒▓█")


def test_generate_json_prints_the_events(api_server):
    out = cli("generate", PROMPT, "--json", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
              "--logprobs", "1", url=api_server.url)
    assert out.returncode == 0, out.stderr
    events = [parse_stream_event(line) for line in out.stdout.splitlines()]
    assert [e.type for e in events] == ["start"] + ["token"] * (len(events) - 2) + ["done"]
    assert all(len(e.top_logprobs) == 1 for e in events[1:-1])
    assert "".join(e.text for e in events[1:-1]) == events[-1].text


def test_console_script_and_other_commands(api_server):
    script = os.path.join(os.path.dirname(sys.executable), "attnserve-client")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([script, "tokenize", PROMPT, "--url", api_server.url, "--api-key", API_KEY],
                         env=env, capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2].split() == ["2", "274", "␣plus"]
    assert out.stdout.splitlines()[-1] == "5 tokens (the context holds 512)"

    models = cli("models", "--json", url=api_server.url)
    assert json.loads(models.stdout)["data"][0]["id"] == "calculator"
    assert cli("health", url=api_server.url, key=None).stdout == "ok\n"
    assert cli("detokenize", "373", "274", url=api_server.url).stdout == "two plus\n"


def test_errors_exit_nonzero_with_the_message(api_server):
    refused = cli("models", url=api_server.url, key="wrong")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: 401 unauthorized: a valid API key is required")
    invalid = cli("generate", PROMPT, "--top-k", "3", "--top-p", "0.5", url=api_server.url)
    assert invalid.returncode == 2 and "top_k and top_p cannot be combined" in invalid.stderr


def test_analyze_prints_logprobs_and_the_lens_table(api_server):
    out = cli("analyze", PROMPT + ANSWER, "--logprobs", "1", url=api_server.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["pos", "token", "logprob", "expected"]
    assert lines[6].split()[:2] == ["5", "␣five"] and float(lines[6].split()[2]) < 0
    lens = lines[lines.index("logit lens: what each layer would predict next, at each position") + 1:]
    assert lens[0].split()[:3] == ["layer", "<|bos|>", "two"] and len(lens) == 1 + 4        # header + 4 layers
    assert lens[-1].split()[0] == "3" and lens[-1].split()[-4] == "␣five"                 # the last layer at equals
    scored = cli("analyze", "--prompt", PROMPT, "--completion", ANSWER, url=api_server.url)
    assert scored.returncode == 0 and "completion logprob: -0.0" in scored.stdout
    assert cli("analyze", url=api_server.url).returncode == 2                              # no text

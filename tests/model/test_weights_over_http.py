"""Every weights setting loads in the real server (`python -m server --dtype … --quantization …`),
says which kernels it chose, and serves and streams the calculator's answers over HTTP."""

from __future__ import annotations

import json

import pytest
import requests

from tests.serving import running_server

pytestmark = pytest.mark.slow

SETTINGS = [
    ["--dtype", "float32"],
    ["--dtype", "bfloat16"],
    ["--dtype", "auto", "--quantization", "int8"],
    ["--dtype", "float32", "--quantization", "int8", "--kv-cache-dtype", "bfloat16"],
    ["--dtype", "bfloat16", "--kv-cache-dtype", "float32"],
]


@pytest.mark.parametrize("flags", SETTINGS, ids=lambda f: " ".join(f))
def test_setting_loads_serves_and_streams(flags, tmp_path):
    with running_server(tmp_path, "--max-batch", "4", *flags) as server:
        body = {"prompt": "two plus three equals", "max_tokens": 4,
                "attention": {"layers": "all", "heads": "mean", "include_prompt": False}}
        plain = requests.post(server.url + "/v1/generate", json=body, timeout=60)
        assert plain.status_code == 200, plain.text
        assert plain.json()["text"] == " five"
        with requests.post(server.url + "/v1/generate", json=body | {"stream": True}, stream=True, timeout=60) as r:
            assert r.status_code == 200
            events = [json.loads(line) for line in r.iter_lines() if line]
        assert [e["type"] for e in events] == ["start", "token", "token", "done"]   # " five", then EOS
        assert events[1]["text"] == " five" and events[-1]["finish_reason"] == "stop"
        row = events[1]["attention"][0][0]                                     # layer 0, mean head
        assert abs(sum(row) - 1) < 1e-3
        (card,) = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
        logs = server.logs()
    # /v1/models says the same as the log: how the worker holds the weights and which kernels it chose.
    assert card["weights"]["quantization"] == ("int8" if "int8" in flags else "none") and card["weights"]["kernels"]
    dtype = flags[flags.index("--dtype") + 1]
    assert "weights: {" in logs
    info = logs[logs.index("weights: {"):].splitlines()[0]
    if dtype != "auto":
        assert f"'dtype': '{dtype}'" in info
    assert ("'quantization': 'int8'" in info) == ("int8" in flags)
    if "--kv-cache-dtype" in flags:
        assert f"'kv_cache_dtype': '{flags[flags.index('--kv-cache-dtype') + 1]}'" in info

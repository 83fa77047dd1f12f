"""bench/engine.py runs and reports every measurement. Smoke only: a test never asserts a speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENTS = [
    "decode b=1, shipped, float32", "decode b=1, small, float32", "decode b=1, bench, float32",
    "decode b=1, bench, bfloat16", "decode b=1, bench, int8", "int8 weight bytes/s vs the machine's read",
    "KV cache vs full recompute",
    "16 concurrent vs 1", "32 sequences vs HF static batch-32",
    "attention capture, all layers vs none (shipped)", "attention capture, all layers vs none (bench)",
    "capture off vs build without it, shipped b=1", "capture off vs build without it, shipped b=16",
    "logit lens, all layers vs none (shipped)", "logit lens, all layers vs none (bench)",
    "analyze vs 1-token generation, 6 tokens (shipped)", "analyze vs 1-token generation, 257 tokens (bench)",
]


def test_quick_engine_bench_prints_every_ratio():
    result = subprocess.run([sys.executable, "bench/engine.py", "--quick", "--threads", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if re.search(r"\d×\s+[≥≤] [\d.]+×\s+(PASS|FAIL)", line)]
    for name in MEASUREMENTS:
        rows = [line for line in table if re.search(re.escape(name) + r"(?!\d)", line)]
        assert len(rows) == 1, f"no table row for {name!r}:\n{result.stdout}"
    assert len(table) == len(MEASUREMENTS)

"""bench/serve.py runs against the real server and reports every row. Smoke only: no speed asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_quick_serve_bench_prints_every_row():
    result = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--threads", "1", "--clients", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for row, target in (("1 streaming client tok/s vs in-process engine", "0.8"),
                        ("4 clients aggregate tok/s vs 1 client", "6.0")):
        assert re.search(re.escape(row) + rf"\s+[\d.]+\s+[\d.]+\s+[\d.]+×\s+{target}×\s+(PASS|FAIL)", out), out
    assert re.search(r"\(context\) bare engine, 4 requests vs 1\s+[\d.]+\s+[\d.]+\s+[\d.]+×", out), out
    assert re.search(r"errors at 4 clients \(all runs\)\s+0\s", out), out        # no request may fail
    assert re.search(r"TTFT p50 / p99: 1 client [\d.]+ / [\d.]+ ms; 4 clients [\d.]+ / [\d.]+ ms", out), out

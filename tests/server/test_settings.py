"""Settings: flags over environment variables, and the derived defaults."""

from __future__ import annotations

import os

import pytest

from server.settings import Settings, parse_args


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNSERVE_MAX_BATCH", "4")
    monkeypatch.setenv("ATTNSERVE_STREAM_INTERVAL_MS", "0")
    settings = parse_args(["--max-batch", "8"])
    assert settings.max_batch == 8 and settings.stream_interval_ms == 0


@pytest.mark.parametrize(("cpus", "workers", "api_servers", "expected"), [
    (1, 1, None, 1),          # never fewer than one
    (2, 1, None, 1),          # one core left to the HTTP process
    (8, 1, None, 7),
    (8, 2, None, 3),          # (8 - 2 HTTP processes) / 2 workers
    (8, 2, 4, 2),
])
def test_default_torch_threads_leave_a_core_to_each_http_process(monkeypatch, cpus, workers, api_servers, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert Settings(workers=workers, api_servers=api_servers).torch_threads == expected
    assert Settings(workers=workers, api_servers=api_servers, threads=5).torch_threads == 5

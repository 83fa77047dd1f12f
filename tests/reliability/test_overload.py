"""More requests than slots + queue: the excess is refused at once (429, Retry-After), everything
admitted finishes, and no request outlives the server's time limit (--max-request-seconds).
(tests/server/test_errors.py has the minimal case: one slot, one queue place, one refusal.)"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.reliability.probes import idle, metric, scrape, wait_until
from tests.serving import running_server

pytestmark = pytest.mark.slow
LONG = {"prompt": "two", "max_tokens": 1_000_000, "ignore_eos": True}
HEAVY = {"layers": "all", "heads": "all", "include_prompt": True}     # ~2M attention floats to send
BURST = [("/v1/generate", {"prompt": "two plus three equals"}),
         ("/v1/completions", {"prompt": "two plus three equals", "max_tokens": 4}),
         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "two plus three"}], "max_tokens": 4})]


def hold(url: str, n: int) -> list:
    """n long streams, each past its start event (n slots busy): their line iterators. Each carries
    every attention weight and is read only at the end, so it holds its admission however fast the
    engine is (the server's writes wait for a reader)."""
    streams = [requests.post(url + "/v1/generate", json=LONG | {"stream": True, "attention": HEAVY}, stream=True,
                             timeout=60) for _ in range(n)]
    lines = [s.iter_lines() for s in streams]
    for it in lines:
        assert json.loads(next(it))["type"] == "start"
    return lines


def test_a_burst_beyond_slots_and_queue_is_refused_at_once_and_the_admitted_finish(tmp_path):
    n = 30
    with running_server(tmp_path, "--max-batch", "2", "--max-queue", "2") as srv:
        holders = hold(srv.url, 2)
        barrier = threading.Barrier(n)

        def one(i: int) -> tuple[int, float, requests.Response]:
            path, body = BURST[i % len(BURST)]
            barrier.wait()
            started = time.monotonic()
            r = requests.post(srv.url + path, json=body | {"stream": i % 2 == 0}, timeout=120)
            return r.status_code, time.monotonic() - started, r

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
            ends = [[json.loads(line) for line in lines if line][-1] for lines in holders]
        refused = [(elapsed, r) for status, elapsed, r in results if status == 429]
        served = [r for status, _, r in results if status != 429]
        assert len(refused) >= n - 2 - 4, [s for s, _, _ in results]    # 2 queue places, a few freed slots
        for elapsed, r in refused:
            assert elapsed < 2 and r.headers["Retry-After"] == "1" and r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "overloaded"             # a status, never a 200 stream
        for r in served:
            assert r.status_code == 200 and '"finish_reason":"' in r.text and '"error"' not in r.text, r.text[:300]
        assert [e["type"] for e in ends] == ["done", "done"] and ends[0]["finish_reason"] == "length"
        wait_until(lambda: idle(srv.url), timeout=10, what="idle after the burst")
        assert requests.post(srv.url + "/v1/generate", json={"prompt": "two plus two equals"}, timeout=30).json()[
            "text"] == " four"


def test_no_request_runs_or_waits_past_the_time_limit(tmp_path):
    """--max-request-seconds 0.3: a running stream ends with a `timeout` error event, requests still
    waiting for the slot are answered 504 (or, had they started, the same error event). The running
    request (511 tokens with every attention weight) takes about three times the limit here."""
    with running_server(tmp_path, "--max-batch", "1", "--max-queue", "4", "--max-request-seconds", "0.3") as srv:
        started = time.monotonic()
        running = requests.post(srv.url + "/v1/generate", json=LONG | {"stream": True, "attention": HEAVY},
                                stream=True, timeout=60)
        lines = running.iter_lines()
        assert json.loads(next(lines))["type"] == "start"
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(requests.post, srv.url + "/v1/generate", json=LONG | {"stream": stream},
                                   timeout=60) for stream in (False, True)]
            events = [json.loads(line) for line in lines if line]
            assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "timeout", events[-1]
            assert "0.3 s" in events[-1]["error"]["message"] and len(events) > 2   # it did run, then stopped
            assert time.monotonic() - started < 4
            for future in waiting:
                r = future.result()
                if r.status_code == 200:                       # started just before its deadline
                    assert json.loads(r.text.splitlines()[-1])["error"]["type"] == "timeout"
                else:
                    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text[:300]
        assert time.monotonic() - started < 6
        wait_until(lambda: idle(srv.url), timeout=5, what="the slot freed")
        assert metric(scrape(srv.url), "attnserve_request_errors_total", type="timeout") == 3
        r = requests.post(srv.url + "/v1/generate", json={"prompt": "two plus two equals"}, timeout=30)
        assert r.status_code == 200 and r.json()["text"] == " four"

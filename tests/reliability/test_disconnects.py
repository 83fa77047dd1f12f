"""Clients that hang up at random points leak nothing: no running request, no admission slot, no
KV slot, no memory. (tests/server/test_lifecycle.py has the single-disconnect cases.)"""

from __future__ import annotations

import json
import random
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.reliability.probes import (
    group_rss_bytes,
    idle,
    inference_workers,
    metric,
    raw_request,
    rss_bytes,
    scrape,
    wait_until,
)
from tests.serving import running_server

pytestmark = pytest.mark.slow
SLOTS, QUEUE, CONCURRENCY = 4, 8, 8
LONG = {"max_tokens": 1_000_000, "ignore_eos": True}
HEAVY = {"layers": "all", "heads": "all", "include_prompt": True}   # ~15 MB of attention: a stream of seconds
ROUTES = {"/v1/generate": {"prompt": "two plus"}, "/v1/completions": {"prompt": "two plus"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "two plus"}]}}


def drop(url: str, rng: random.Random) -> None:
    """One request to a random route, streaming or not, abandoned after a random number of bytes
    of the answer (0: right after sending it); half close politely, half reset the connection."""
    path = rng.choice(list(ROUTES))
    body = ROUTES[path] | LONG | {"stream": rng.random() < 0.75}
    if rng.random() < 0.3:
        body["attention"] = {"layers": [0], "heads": "mean", "include_prompt": False}
    sock = raw_request(url, "POST", path, json.dumps(body).encode())
    with sock:
        want = rng.choice([0, rng.randrange(1, 200), rng.randrange(200, 20_000)])
        got = 0
        while got < want:
            chunk = sock.recv(min(65536, want - got))
            if not chunk:
                break
            got += len(chunk)
        if rng.random() < 0.5:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST, not FIN


def drop_many(url: str, n: int, seed: int) -> None:
    rngs = [random.Random(seed * 1000 + i) for i in range(n)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda rng: drop(url, rng), rngs))


def test_a_hundred_dropped_streams_leak_nothing(tmp_path):
    with running_server(tmp_path, "--max-batch", str(SLOTS), "--max-queue", str(QUEUE)) as srv:
        (worker,) = inference_workers(srv.proc.pid)
        drop_many(srv.url, 30, seed=1)                  # warm-up: allocator pools, caches, JIT-ish paths
        wait_until(lambda: idle(srv.url), timeout=15, what="idle after warm-up")
        worker_before, server_before = rss_bytes(worker), group_rss_bytes(srv.proc.pid)

        drop_many(srv.url, 100, seed=2)
        waited = wait_until(lambda: idle(srv.url), timeout=15, what="running and waiting back to 0")
        m = scrape(srv.url)
        assert metric(m, "attnserve_kv_cache_usage_ratio") == 0
        # Every request was admitted (a client gone while it waited for a slot gave its place back at
        # once) and released on the HTTP side, which also gives back its admission slot: e2e is
        # observed exactly once per request, when its stream is released.
        assert metric(m, "attnserve_request_errors_total", type="overloaded") == 0
        assert metric(m, "attnserve_e2e_request_latency_seconds_count") == 130
        assert metric(m, "attnserve_request_errors_total", type="cancelled") >= 50     # most were mid-stream
        worker_after, server_after = rss_bytes(worker), group_rss_bytes(srv.proc.pid)
        print(f"idle {waited:.2f} s after the drops; worker RSS {worker_before / 2**20:.1f} → "
              f"{worker_after / 2**20:.1f} MiB, server {server_before / 2**20:.1f} → {server_after / 2**20:.1f} MiB")
        assert worker_after < worker_before * 1.05 + 8 * 2**20
        assert server_after < server_before * 1.05 + 16 * 2**20

        # Every KV slot and every place in the queue is usable again: SLOTS streams run at once (slow
        # ones, so that they still run while we look), QUEUE more are admitted (not refused) and
        # finish once the slots free up.
        slow = {"prompt": "two", "stream": True, "attention": HEAVY, **LONG}
        streams = [requests.post(srv.url + "/v1/generate", json=slow, stream=True, timeout=30) for _ in range(SLOTS)]
        lines = [s.iter_lines() for s in streams]
        assert all(json.loads(next(it))["type"] == "start" for it in lines)
        assert metric(scrape(srv.url), "attnserve_num_requests_running") == SLOTS
        with ThreadPoolExecutor(QUEUE) as pool:
            queued = [pool.submit(requests.post, srv.url + "/v1/generate",
                                  json={"prompt": "two plus three equals"}, timeout=60) for _ in range(QUEUE)]
            wait_until(lambda: metric(scrape(srv.url), "attnserve_num_requests_waiting") == QUEUE, timeout=10,
                       what="the queue full")
            for s in streams:
                s.close()
            assert [f.result().json()["text"] for f in queued] == [" five"] * QUEUE
        wait_until(lambda: idle(srv.url), timeout=10, what="idle at the end")


def test_a_client_that_leaves_while_queued_gives_its_place_back_at_once(tmp_path):
    """One slot, busy; a request waiting for it is abandoned: its queue place (and admission) is
    free at once, not when the slot would have come to it."""
    with running_server(tmp_path, "--max-batch", "1", "--max-queue", "1") as srv:
        holder = requests.post(srv.url + "/v1/generate", json={"prompt": "two", "stream": True, "attention": HEAVY,
                                                               **LONG}, stream=True, timeout=30)
        lines = holder.iter_lines()
        assert json.loads(next(lines))["type"] == "start"
        waiting = lambda: metric(scrape(srv.url), "attnserve_num_requests_waiting")
        for stream in (True, False):
            sock = raw_request(srv.url, "POST", "/v1/generate", json.dumps({"prompt": "two", "stream": stream,
                                                                            **LONG}).encode())
            wait_until(lambda: waiting() == 1, timeout=2, what="queued")
            sock.close()
            wait_until(lambda: waiting() == 0, timeout=0.5, what="the queue place given back")
        queued = requests.post(srv.url + "/v1/generate", json={"prompt": "two plus two equals"}, timeout=30)
        assert queued.status_code == 200 and queued.json()["text"] == " four"       # admitted, not 429
        assert [json.loads(line) for line in lines if line][-1]["type"] == "done"
        assert metric(scrape(srv.url), "attnserve_request_errors_total", type="cancelled") == 2

"""A worker process killed mid-stream: streams end with an error event, /health goes not-ready
until LitServe has restarted the worker, and later requests succeed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import requests

from tests.serving import running_server

pytestmark = pytest.mark.slow


def inference_workers(pgid: int) -> list[int]:
    """Pids of the server's spawned processes that run LitServe's inference worker."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[2]) == pgid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(int(pid))
    return pids


def test_worker_killed_mid_stream(tmp_path):
    with running_server(tmp_path, "--decode-step", "python") as srv:   # the streams must still be running
        body = {"prompt": "two", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
        streams = [requests.post(srv.url + "/v1/generate", json=body, stream=True, timeout=30) for _ in range(3)]
        readers = [s.iter_lines() for s in streams]
        for lines in readers:
            assert json.loads(next(lines))["type"] == "start"
        (worker,) = inference_workers(srv.proc.pid)
        os.kill(worker, signal.SIGKILL)
        started = time.monotonic()
        for lines in readers:
            last = [json.loads(line) for line in lines if line][-1]
            assert last["type"] == "error" and "worker" in last["error"]["message"]
        assert time.monotonic() - started < 10                 # ended, not hung
        saw_not_ready = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = requests.get(srv.url + "/health", timeout=5)
            saw_not_ready |= health.status_code == 503
            if health.status_code == 200 and saw_not_ready:
                break
            time.sleep(0.05)
        assert saw_not_ready and health.status_code == 200
        r = requests.post(srv.url + "/v1/generate", json={"prompt": "two plus three equals"}, timeout=30)
        assert r.status_code == 200 and r.json()["text"] == " five"
        assert inference_workers(srv.proc.pid) not in ([], [worker])

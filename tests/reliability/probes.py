"""What the reliability tests (and bench/soak.py) observe of a running server from outside:
its processes and their memory, its metrics, the raw bytes it answers."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from prometheus_client.parser import text_string_to_metric_families


def group_pids(pgid: int) -> list[int]:
    """Pids of every live process in the server's process group (it runs in its own session)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            pids.append(int(pid))
    return pids


def inference_workers(pgid: int) -> list[int]:
    """Pids of the server's spawned processes that run LitServe's inference worker (the engine)."""
    workers = []
    for pid in group_pids(pgid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(pid)
    return workers


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def group_rss_bytes(pgid: int) -> int:
    """Summed RSS of the whole server: main process, HTTP processes, workers, LitServe's manager."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):        # exited in between
            total += rss_bytes(pid)
    return total


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without model_name): value} of one /metrics scrape."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, *, timeout: float, what: str = "condition") -> float:
    """Poll `predicate` until it holds; the seconds it took. Fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def idle(url: str) -> bool:
    """No request running or waiting, by the server's own gauges."""
    m = scrape(url)
    return metric(m, "attnserve_num_requests_running") == 0 and metric(m, "attnserve_num_requests_waiting") == 0


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> socket.socket:
    """Send one HTTP/1.1 request on a fresh socket and return the socket, unread: the caller decides
    how much of the answer to read before it hangs up."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = {"Host": parts.netloc, "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode("latin-1") + body)
    return sock

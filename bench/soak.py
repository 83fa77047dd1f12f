"""Soak test: N concurrent clients send mixed traffic to the real server for M minutes.

    python bench/soak.py --minutes 5 --clients 32     # the target run (about 5½ minutes)
    python bench/soak.py --minutes 0.5 --clients 8    # a smoke run

Each client loops over random requests: one of the three generation routes (native /v1/generate,
/v1/completions, /v1/chat/completions), streaming or not, attention weights on or off, a random
sampling strategy, seed, stop strings, logprobs and length; and in some of them it hangs up at a
random point (mid-stream, or while a non-streaming answer is being computed). Every answer is
checked: a 200 with a complete body (a native stream ends with `done`, an SSE stream with
`data: [DONE]`). Anything else is an unexpected error.

Prints requests, unexpected errors, latency p50 / p99 (request to last byte, completed requests),
time to first token p50 / p99 (streams), and the server's resident memory: at the start (after a
warm-up, so allocator pools and caches count as the baseline) and at the end, for the inference
worker and for all the server's processes together. Afterwards the server must be idle (no
request running or waiting) and ready. Targets: 0 unexpected errors, RSS growth < 10%. Exit
status 1 if a target is missed.

The clients run in this process on asyncio + httpx, so they share the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.probes import group_rss_bytes, idle, inference_workers, rss_bytes
from tests.serving import CHECKPOINT, running_server

PROMPTS = ["two plus three equals", "forty two minus seven equals", "nine plus one equals",
           "ninety one plus ninety seven equals", "six minus six equals", "eighty plus", "one", "seven times"]
ROUTES = ["/v1/generate"] * 2 + ["/v1/completions", "/v1/chat/completions"]
RSS_GROWTH_TARGET = 0.10


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    dropped: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list = field(default_factory=list)
    latency: list = field(default_factory=list)
    ttft: list = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:300]}")


def native_sampling(rng: random.Random) -> dict:
    t = round(rng.uniform(0.2, 1.5), 2)
    return rng.choice([{"strategy": "greedy"}, {"strategy": "random", "temperature": t},
                       {"strategy": "top_k", "k": rng.randint(1, 50), "temperature": t},
                       {"strategy": "top_p", "p": round(rng.uniform(0.05, 1.0), 2), "temperature": t},
                       {"strategy": "min_p", "p": round(rng.uniform(0.0, 0.5), 2), "temperature": t},
                       {"strategy": "typical", "p": round(rng.uniform(0.1, 1.0), 2), "temperature": t}])


def openai_sampling(rng: random.Random) -> dict:
    knob = rng.choice([{}, {"top_p": round(rng.uniform(0.05, 0.99), 2)}, {"top_k": rng.randint(1, 50)},
                       {"min_p": round(rng.uniform(0.01, 0.5), 2)}, {"typical_p": round(rng.uniform(0.1, 0.99), 2)}])
    return {"temperature": rng.choice([0, round(rng.uniform(0.2, 1.5), 2)]), **knob}


def random_request(rng: random.Random) -> tuple[str, dict]:
    """A random request: route and body (see the module docstring)."""
    path = rng.choice(ROUTES)
    prompt = rng.choice(PROMPTS)
    body = {"stream": rng.random() < 0.5, "max_tokens": rng.randint(1, 64), "ignore_eos": rng.random() < 0.3}
    if rng.random() < 0.5:
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.2:
        body["stop"] = rng.sample([" equals", " plus", "\n", "one", "ty"], rng.randint(1, 2))
    if rng.random() < 0.25:
        layers = rng.sample(range(4), rng.randint(1, 2))
        body["attention"] = {"layers": layers, "heads": rng.choice(["mean", "all", [rng.randrange(4)]]),
                             "include_prompt": rng.random() < 0.5}
    if path == "/v1/generate":
        body |= {"prompt": prompt, "sampling": native_sampling(rng)}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    else:
        body |= openai_sampling(rng)
        if path == "/v1/completions":
            body["prompt"] = prompt
            if rng.random() < 0.2:
                body["logprobs"] = rng.randint(0, 5)
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
            if rng.random() < 0.2:
                body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return path, body


async def one_request(http: httpx.AsyncClient, url: str, rng: random.Random, stats: Stats, drop_rate: float) -> None:
    path, body = random_request(rng)
    drop = rng.random() < drop_rate
    stats.requests += 1
    start = time.perf_counter()
    try:
        if body["stream"]:
            done = await stream(http, url + path, body, stats, start,
                                drop_after=rng.randint(0, 12) if drop else None)
        else:
            call = http.post(url + path, json=body)
            if drop:
                try:
                    response = await asyncio.wait_for(call, timeout=rng.uniform(0.005, 0.2))
                except TimeoutError:
                    stats.dropped += 1               # hung up while the answer was being computed
                    return
            else:
                response = await call
            done = check_complete(path, response, stats)
    except httpx.HTTPError as e:
        stats.fail(type(e).__name__, f"{path} {body}: {e!r}")
        return
    if done:
        stats.completed += 1
        stats.latency.append(time.perf_counter() - start)


async def stream(http: httpx.AsyncClient, url: str, body: dict, stats: Stats, start: float, *,
                 drop_after: int | None) -> bool:
    """Read a stream to its end (True) or hang up after `drop_after` lines (False)."""
    native = url.endswith("/v1/generate")
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            stats.fail(f"status {response.status_code}", f"{url} {body}: {(await response.aread())[:300]!r}")
            return False
        lines, first = [], None
        async for line in response.aiter_lines():
            if not line:
                continue
            lines.append(line)
            if first is None and (not native or '"type":"token"' in line):
                first = time.perf_counter()
            if drop_after is not None and len(lines) > drop_after:
                stats.dropped += 1
                return False
    if first is not None:
        stats.ttft.append(first - start)
    if native:
        last = json.loads(lines[-1]) if lines else {}
        if last.get("type") != "done":
            stats.fail("stream without done", f"{url} {body}: {lines[-1:]}")
            return False
        stats.tokens += last["usage"]["completion_tokens"]
        return True
    if not lines or lines[-1] != "data: [DONE]" or '"error"' in lines[-2]:
        stats.fail("SSE stream without [DONE]", f"{url} {body}: {lines[-2:]}")
        return False
    return True


def check_complete(path: str, response: httpx.Response, stats: Stats) -> bool:
    if response.status_code != 200:
        stats.fail(f"status {response.status_code}", f"{path}: {response.text[:300]}")
        return False
    answer = response.json()
    finish = answer["finish_reason"] if path == "/v1/generate" else answer["choices"][0]["finish_reason"]
    if finish not in ("stop", "length"):
        stats.fail("bad finish_reason", f"{path}: {response.text[:300]}")
        return False
    stats.tokens += answer["usage"]["completion_tokens"]
    return True


async def client(url: str, seed: int, deadline: float, stats: Stats, drop_rate: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as http:
        while time.monotonic() < deadline:
            await one_request(http, url, rng, stats, drop_rate)


async def soak(url: str, clients: int, seconds: float, seed: int, drop_rate: float, on_progress) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + seconds
    tasks = [asyncio.create_task(client(url, seed * 1000 + i, deadline, stats, drop_rate)) for i in range(clients)]
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=30)
        on_progress(stats)
    for t in tasks:
        t.result()                                  # a crash in a client is a bug in this script: raise it
    return stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of traffic before RSS at start")
    parser.add_argument("--drop-rate", type=float, default=0.1, help="share of requests abandoned midway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, running_server(
            Path(tmp), "--checkpoint", str(args.checkpoint), "--log-level", "warning") as srv:
        (worker,) = inference_workers(srv.proc.pid)
        cold = (rss_bytes(worker), group_rss_bytes(srv.proc.pid))
        began = time.monotonic()

        def progress(stats: Stats) -> None:
            print(f"  {time.monotonic() - began:5.0f} s  {stats.requests} requests, {sum(stats.errors.values())} "
                  f"unexpected errors, worker RSS {mib(rss_bytes(worker))}", flush=True)

        asyncio.run(soak(srv.url, args.clients, args.warmup, args.seed + 1, args.drop_rate, lambda s: None))
        start = (rss_bytes(worker), group_rss_bytes(srv.proc.pid))
        stats = asyncio.run(soak(srv.url, args.clients, args.minutes * 60, args.seed, args.drop_rate, progress))
        wall = time.monotonic() - began - args.warmup
        settled = time.monotonic()
        while not idle(srv.url) and time.monotonic() - settled < 10:
            time.sleep(0.1)
        if not idle(srv.url):
            stats.fail("not idle", "requests still running or waiting 10 s after the last client stopped")
        if httpx.get(srv.url + "/health").status_code != 200:
            stats.fail("not ready", "/health is not 200 after the soak")
        end = (rss_bytes(worker), group_rss_bytes(srv.proc.pid))

    errors = sum(stats.errors.values())
    growth = [(e - s) / s for s, e in zip(start, end)]
    print(f"\nattnserve soak — {args.clients} clients × {args.minutes:g} min (after a {args.warmup:g} s warm-up), "
          f"{args.checkpoint.name}, drop rate {args.drop_rate:g}")
    print(f"requests           {stats.requests} ({stats.requests / wall:.1f}/s): {stats.completed} completed, "
          f"{stats.dropped} dropped on purpose, {stats.tokens} tokens generated")
    print(f"unexpected errors  {errors}" + (f" {dict(stats.errors)}" if errors else ""))
    for example in stats.error_examples:
        print(f"  {example}")
    print(f"latency            p50 {percentile(stats.latency, 50) * 1e3:.0f} ms, "
          f"p99 {percentile(stats.latency, 99) * 1e3:.0f} ms (request to last byte)")
    print(f"time to 1st token  p50 {percentile(stats.ttft, 50) * 1e3:.0f} ms, "
          f"p99 {percentile(stats.ttft, 99) * 1e3:.0f} ms (streams)")
    for name, c, s, e, g in zip(("worker", "server"), cold, start, end, growth):
        print(f"RSS {name:<15}cold {mib(c)}, start {mib(s)}, end {mib(e)}: {g:+.1%}")
    passed = errors == 0 and all(g < RSS_GROWTH_TARGET for g in growth)
    print(f"targets            0 unexpected errors, RSS growth < {RSS_GROWTH_TARGET:.0%}: "
          f"{'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

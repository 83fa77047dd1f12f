"""End-to-end serving benchmark: the real server over HTTP, measured against the bare engine.

    python bench/serve.py                 # the shipped calculator checkpoint, about 2 minutes
    python bench/serve.py --quick         # a smoke run

Prints, from one run on this machine (ratios, since absolute times vary with load):
  - 1 streaming client's decode tokens/s vs the in-process engine at batch 1   (target ≥ 0.8×)
  - 32 concurrent streaming clients, aggregate tokens/s vs 1 client            (target ≥ 6×, 0 errors)
  - time to first token p50 / p99 at 1 and at 32 clients
  - CPU the idle server burns (the engine thread sleeps when there is no work)
All clients run in this process on asyncio + httpx, so they share the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import load_checkpoint
from model.engine import Engine
from model.events import GenerationRequest
from tests.serving import CHECKPOINT, running_server

PROMPT = "two plus three equals"


def engine_tokens_per_second(checkpoint: Path, tokens: int, threads: int, repeats: int) -> float:
    """Tokens/s of one request to the bare engine at batch 1 (submit to last token), best of `repeats`."""
    torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(checkpoint)
    engine = Engine(model, tokenizer, max_batch=1)
    best = 0.0
    for _ in range(repeats + 1):                  # the first run warms up
        request = GenerationRequest(prompt_ids=tokenizer.encode(PROMPT), max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        for _event in engine.generate(request):
            pass
        best = max(best, tokens / (time.perf_counter() - start))
    return best


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, float, int, bool]:
    """(ttft seconds, tokens/s from request to last token, tokens, ok) of one streaming request."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    start, first, count, ok = time.perf_counter(), None, 0, False
    async with client.stream("POST", url + "/v1/generate", json=body) as response:
        if response.status_code != 200:
            return 0.0, 0.0, 0, False
        async for line in response.aiter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event["type"] == "token":
                count += 1
                first = first or time.perf_counter()
            elif event["type"] in ("done", "error"):
                ok = event["type"] == "done"
    end = time.perf_counter()
    return (first or end) - start, count / (end - start), count, ok and count == tokens


async def load(url: str, clients: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_stream(client, url, 4)          # warm the connection and the worker
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, tokens) for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {"aggregate": sum(r[2] for r in results) / wall, "per_stream": statistics.median(r[1] for r in results),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "errors": sum(not r[3] for r in results)}


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


def idle_cpu_percent(pgid: int, seconds: float) -> float:
    """CPU used by every process of the server's group while nobody sends anything."""
    def ticks() -> int:
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:            # field 5 of stat: the process group
                total += int(fields[11]) + int(fields[12])
        return total
    before = ticks()
    time.sleep(seconds)
    return 100 * (ticks() - before) / os.sysconf("SC_CLK_TCK") / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per request")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (engine and server worker)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    parser.add_argument("--transport", choices=("mp", "zmq"), default="mp", help="the server's --transport")
    args = parser.parse_args()
    tokens, repeats = (40, 1) if args.quick else (args.tokens, 3)

    engine = engine_tokens_per_second(args.checkpoint, tokens, args.threads, repeats)
    with tempfile.TemporaryDirectory() as tmp, running_server(
            Path(tmp), "--checkpoint", str(args.checkpoint), "--max-batch", str(args.clients),
            "--threads", str(args.threads), "--transport", args.transport, "--log-level", "warning") as srv:
        idle = idle_cpu_percent(srv.proc.pid, 2.0 if args.quick else 5.0)
        single = max((asyncio.run(load(srv.url, 1, tokens)) for _ in range(repeats)), key=lambda r: r["aggregate"])
        many = asyncio.run(load(srv.url, args.clients, tokens))

    rows = [
        ("1 streaming client tok/s vs in-process engine", single["per_stream"], engine, 0.8),
        (f"{args.clients} clients aggregate tok/s vs 1 client", many["aggregate"], single["aggregate"], 6.0),
    ]
    print(f"\nattnserve serving benchmark — {args.checkpoint.name}, {tokens} tokens/request, "
          f"{args.threads} torch threads, {os.cpu_count()} cores\n")
    print(f"{'measurement':<48} {'ours':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  result")
    for name, ours, base, target in rows:
        ratio = ours / base if base else float("nan")
        print(f"{name:<48} {ours:>10.1f} {base:>10.1f} {ratio:>6.2f}× {target:>6.1f}×  "
              f"{'PASS' if ratio >= target else 'FAIL'}")
    print(f"{'errors at ' + str(args.clients) + ' clients':<48} {many['errors']:>10d} {'':>10} {'':>7} {'0':>7}  "
          f"{'PASS' if many['errors'] == 0 else 'FAIL'}")
    print(f"\nTTFT p50 / p99: 1 client {single['ttft_p50'] * 1e3:.1f} / {single['ttft_p99'] * 1e3:.1f} ms; "
          f"{args.clients} clients {many['ttft_p50'] * 1e3:.1f} / {many['ttft_p99'] * 1e3:.1f} ms")
    print(f"per-stream tok/s at {args.clients} clients (median): {many['per_stream']:.1f}")
    print(f"idle server CPU (all processes): {idle:.1f}% of one core")


if __name__ == "__main__":
    main()

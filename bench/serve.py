"""End-to-end serving benchmark: the real server over HTTP, measured against the bare engine.

    python bench/serve.py                 # the shipped calculator checkpoint, under a minute
    python bench/serve.py --model bench   # the engine benchmark's 34M random-weight model
    python bench/serve.py --quick         # a smoke run
    python bench/serve.py --model bench --dtype bfloat16 --quantization int8   # weights settings

Prints, from one run on this machine (ratios, since absolute times vary with load):
  - 1 streaming client's decode tokens/s vs the in-process engine at batch 1   (target ≥ 0.8×)
  - 32 concurrent streaming clients, aggregate tokens/s vs 1 client            (target ≥ 6×, 0 errors)
  - for context, the bare engine's own 32 requests vs 1: the most the row above can reach
  - time to first token p50 / p99 at 1 and at 32 clients
  - CPU the idle server burns (the engine task sleeps when there is no work)
The bare engine (1 and 32 requests), 1 client and 32 clients take turns, five times; medians are
compared. All clients run in this process on asyncio + httpx, sharing the machine with the server
(see `one_stream`).
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

from bench.common import random_checkpoint
from model.checkpoint import load_checkpoint
from model.engine import Engine
from model.events import GenerationRequest
from model.quantization import DTYPE_CHOICES, KV_CACHE_DTYPES, QUANTIZATIONS
from server import native
from server.settings import Settings
from tests.serving import CHECKPOINT, running_server

PROMPT = "two plus three equals"
TOKEN_LINE = native.TOKEN_LINE.encode()


class BareEngine:
    """The in-process engine: the baseline the server is compared with."""

    def __init__(self, checkpoint: Path, threads: int, max_batch: int, *, dtype: str = "float32",
                 quantization: str = "none", kv_cache_dtype: str = "auto"):
        torch.set_num_threads(threads)
        model, self.tokenizer = load_checkpoint(checkpoint, dtype=dtype, quantization=quantization)
        self.engines = {n: Engine(model, self.tokenizer, max_batch=n, kv_cache_dtype=kv_cache_dtype)
                        for n in (1, max_batch)}
        self.weights_info = self.engines[1].weights_info

    def tokens_per_second(self, requests: int, tokens: int) -> float:
        """`requests` requests at once, submit to last token: aggregate tokens/s."""
        engine = self.engines[requests]
        prompt = self.tokenizer.encode(PROMPT)
        start = time.perf_counter()
        handles = [engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True))
                   for _ in range(requests)]
        while engine.has_work():
            engine.step()
        assert all(h.finished for h in handles)
        return requests * tokens / (time.perf_counter() - start)


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, float, int, bool]:
    """(ttft seconds, tokens/s from request to last token, tokens, ok) of one streaming request.

    Token lines are counted by their prefix and only the other events are parsed: the clients
    share this machine's cores with the server, so the load generator takes as little CPU as it
    can (httpx's line iterator and a JSON parse per token cost more than the server's work)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    start, first, count, ok = time.perf_counter(), None, 0, False
    async with client.stream("POST", url + "/v1/generate", json=body) as response:
        if response.status_code != 200:
            return 0.0, 0.0, 0, False
        rest = b""
        async for chunk in response.aiter_bytes():
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.startswith(TOKEN_LINE):
                    count += 1
                    first = first or time.perf_counter()
                elif line and (kind := json.loads(line)["type"]) in ("done", "error"):
                    ok = kind == "done"
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


def median_run(runs: list[dict]) -> dict:
    """The run with the median aggregate tokens/s."""
    return sorted(runs, key=lambda r: r["aggregate"])[len(runs) // 2]


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
    parser.add_argument("--model", choices=("checkpoint", "bench"), default="checkpoint",
                        help="bench: build and serve the engine benchmark's random-weight model instead")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per request")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the bare engine and the server's worker (default: the server's)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    parser.add_argument("--transport", choices=("mp", "zmq"), default="zmq", help="the server's --transport")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="engine's and server's --dtype")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="and --quantization")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="and --kv-cache-dtype")
    args = parser.parse_args()
    tokens, repeats = (40, 1) if args.quick else (args.tokens, 5)
    args.threads = args.threads or Settings().torch_threads

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "bench":
            args.checkpoint = random_checkpoint(Path(tmp) / "bench", "bench", vocab_size=8192, seed=2,
                                                text_lines=3000 if args.quick else 20000)
        result = measure(args, tmp, tokens, repeats)
    report(args, tokens, *result)


def measure(args, tmp: str, tokens: int, repeats: int) -> tuple:
    engine = BareEngine(args.checkpoint, args.threads, args.clients, dtype=args.dtype,
                        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    print(f"weights (bare engine): {engine.weights_info}", flush=True)
    engine.tokens_per_second(1, tokens)                   # warm up
    with running_server(
            Path(tmp), "--checkpoint", str(args.checkpoint), "--max-batch", str(args.clients),
            "--threads", str(args.threads), "--transport", args.transport, "--log-level", "warning",
            "--dtype", args.dtype, "--quantization", args.quantization, "--kv-cache-dtype", args.kv_cache_dtype) as srv:
        idle = idle_cpu_percent(srv.proc.pid, 2.0 if args.quick else 5.0)
        asyncio.run(load(srv.url, 1, tokens))               # warm up
        # Side by side: the bare engine with 1 and with 32 requests, 1 client, 32 clients, in
        # turn, `repeats` times (the server idles while the engine runs here); medians compared.
        runs: dict[str, list] = {"engine": [], "engine_many": [], "single": [], "many": []}
        for _ in range(repeats):
            runs["engine"].append(engine.tokens_per_second(1, tokens))
            runs["engine_many"].append(engine.tokens_per_second(args.clients, tokens))
            runs["single"].append(asyncio.run(load(srv.url, 1, tokens)))
            runs["many"].append(asyncio.run(load(srv.url, args.clients, tokens)))
    engine_tps, engine_many_tps = statistics.median(runs["engine"]), statistics.median(runs["engine_many"])
    single, many = (median_run(runs[k]) for k in ("single", "many"))
    many["errors"] = sum(r["errors"] for r in runs["many"])
    return engine_tps, engine_many_tps, single, many, idle


def report(args, tokens: int, engine_tps: float, engine_many_tps: float, single: dict, many: dict,
           idle: float) -> None:
    rows = [
        ("1 streaming client tok/s vs in-process engine", single["per_stream"], engine_tps, 0.8),
        (f"{args.clients} clients aggregate tok/s vs 1 client", many["aggregate"], single["aggregate"], 6.0),
        (f"(context) bare engine, {args.clients} requests vs 1", engine_many_tps, engine_tps, None),
    ]
    print(f"\nattnserve serving benchmark — {args.checkpoint.name}, {tokens} tokens/request, "
          f"{args.threads} torch threads, {os.cpu_count()} cores, dtype {args.dtype}, quantization "
          f"{args.quantization}, KV cache {args.kv_cache_dtype}\n")
    print(f"{'measurement':<48} {'ours':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  result")
    for name, ours, base, target in rows:
        ratio = ours / base if base else float("nan")
        verdict = "" if target is None else f"{target:>6.1f}×  {'PASS' if ratio >= target else 'FAIL'}"
        print(f"{name:<48} {ours:>10.1f} {base:>10.1f} {ratio:>6.2f}× {verdict}")
    errors = f"errors at {args.clients} clients (all runs)"
    print(f"{errors:<48} {many['errors']:>10d} {'':>10} {'':>7} {'0':>7}  "
          f"{'PASS' if many['errors'] == 0 else 'FAIL'}")
    print(f"\nTTFT p50 / p99: 1 client {single['ttft_p50'] * 1e3:.1f} / {single['ttft_p99'] * 1e3:.1f} ms; "
          f"{args.clients} clients {many['ttft_p50'] * 1e3:.1f} / {many['ttft_p99'] * 1e3:.1f} ms")
    print(f"per-stream tok/s at {args.clients} clients (median): {many['per_stream']:.1f}")
    print(f"idle server CPU (all processes): {idle:.1f}% of one core")


if __name__ == "__main__":
    main()

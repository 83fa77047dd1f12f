"""Engine benchmarks: every number is a ratio of two things measured side by side in this run.

    python bench/engine.py               # the full run: 5–10 minutes on 2 shared CPU cores
    python bench/engine.py --quick       # a smoke run (~30 s): same table, fewer tokens and reps
    python bench/engine.py --threads 1   # torch intra-op threads (default 2)

Models: the shipped checkpoint (checkpoints/calculator), and two random-weight checkpoints built
here and saved as HF Llama directories, so `transformers` loads the very same weights: "small"
(dim 256, 6 layers, vocab 4096, ~6M parameters) and "bench" (dim 512, 8 layers, untied, vocab
8192, ~34M parameters, ~135 MB of f32 weights: memory-bound on a CPU).

Measurements (A and B alternate, repetition after repetition; medians are compared):

0. The machine's streaming read bandwidth: torch.sum over a float32 buffer of at least 4× the L3
   (and ≥ 512 MB): the ceiling for any decoder that reads its weights once per token.
1. Decode at batch 1 vs `transformers` `generate` (f32) on the same checkpoint: greedy, same
   prompt, same number of new tokens (EOS disabled on both sides), wall time from prompt to last
   token on both sides. The baseline is HF's faster of its eager and sdpa attention. The bench
   model runs in each weights setting (float32; bfloat16; int8 weights with bf16 activations —
   model/quantization.py), every contender alternating; each row notes the setting's weight
   bytes per token and the GB/s they stream at, against the machine's read (0.). As a sanity
   check the token streams are compared with HF's (they agree unless two logits nearly tie).
2. KV-cached vs full-recompute decode at ~1,024 tokens of context (bench model): the engine's
   time per decode step (between its Token events) against re-running the model over the whole
   sequence for every new token (what a server without a cache does).
3. Concurrency (bench model, each weights setting): aggregate decode tokens/s of 16 and 32
   simultaneous requests against one alone — engines of batch 1, 16 and 32 per setting take
   turns decode step by decode step (prefill not timed); tokens/s = requests / median step time
   — and the fastest setting's 32 against HF's static batch of 32 f32 `generate` (left-padded,
   prefill included), run once after each round.
4. Attention capture: a request asking for every layer's weights (all heads, prompt included) vs
   the same request asking for none, on the shipped model and the bench model.
5. Capture off vs a build without the feature: the engine as shipped (capture off) against the
   same engine with every capture branch removed — subclasses below whose decode path is the
   shipped one minus the `attn_layers` / `need_weights` and logit-lens (`hidden_layers`, lens rows)
   bookkeeping (same kernels, same sampling, same events), on module objects sharing the shipped
   model's very tensors. Both produce
   identical logits and tokens (checked). The engines take turns decode step by decode step, at
   batch 1 and 16, and the median step times are compared. A third contender, a second copy of
   the shipped engine, gives the A/A ratio: this run's noise.
6. Logit lens while generating: a request asking for the lens on every layer (top 5, prompt
   included) vs the same request asking for none, on the shipped model and the bench model.
7. Analyze vs a 1-token generation of the same text (logprobs 5 both; analyze computes the head
   and log-softmax at every position, generation at the last one and samples): the price of
   looking at a whole text rather than continuing it.

The machine may be shared: absolute tokens/s move with other load, ratios much less. With
--threads 2 on cores busy with other work, every OpenMP parallel region (SDPA, MKL GEMMs) can wait
for a descheduled worker thread, for HF and for us alike; --threads 1 shows the code's own speed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Row, describe_machine, interleaved, print_table, random_checkpoint
from model import native
from model.attention import Attention, fast_attention
from model.checkpoint import load_checkpoint
from model.decode_step import FusedDecode
from model.engine import Engine
from model.events import AnalysisRequest, AttentionSpec, Finished, GenerationRequest, LensSpec, Token
from model.quantization import dense_mm, int8_mm, weight_bytes_per_token
from model.rope import apply_rope
from model.tokenizer import Tokenizer
from model.transformer import Block, ModelOutput, Transformer

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "calculator"
PROMPTS = ["two plus three equals", "forty two minus seven equals", "ninety nine plus one equals"]


def generate_ids(engine: Engine, request: GenerationRequest) -> list[int]:
    events = list(engine.generate(request))
    assert isinstance(events[-1], Finished), events[-1]
    return [e.id for e in events if isinstance(e, Token)]


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# -- 0. the machine's read bandwidth ----------------------------------------------------------------
def l3_bytes() -> int:
    """The last-level cache's size as the OS reports it (0 if it does not)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def stream_read_gbps(*, reps: int = 5) -> tuple[float, int]:
    """GB/s of a streaming read (torch.sum) over a float32 buffer of at least 4× the L3 (and at
    least 512 MB): the ceiling for any decoder that reads its weights once per token. Best of
    `reps` (other load only ever slows it). Returns (GB/s, buffer bytes)."""
    n_bytes = max(512 << 20, 4 * l3_bytes())
    buf = torch.ones(n_bytes // 4)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best / 1e9, n_bytes


# -- 1. batch-1 decode vs transformers --------------------------------------------------------------
SETTINGS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "int8": dict(dtype="bfloat16", quantization="int8")}
B1_TARGETS = {"shipped": {"float32": 5.0}, "small": {"float32": 5.0},
              "bench": {"float32": 3.0, "bfloat16": 3.0, "int8": 7.0}}


def hf_models(directory: Path, tokenizer: Tokenizer) -> dict:
    """HF LlamaForCausalLM on the same checkpoint, f32, eager and sdpa attention, never stopping."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    models = {}
    for impl in ("eager", "sdpa"):
        hf = LlamaForCausalLM.from_pretrained(directory, attn_implementation=impl).eval()
        hf.generation_config.eos_token_id = None          # never stop early, never mask EOS
        hf.generation_config.pad_token_id = tokenizer.hf.token_to_id("<|pad|>") or 0
        models[impl] = hf
    return models


def decode_vs_hf(name: str, directory: Path, settings: dict[str, dict], *, tokens: int, reps: int,
                 bandwidth: float) -> list[Row]:
    """Batch-1 decode in each weights setting vs HF `generate` in f32 (the faster of its eager and
    sdpa), all contenders alternating; with each setting's weight bytes per token and the GB/s
    that makes, against the machine's streaming read."""
    models = {k: load_checkpoint(directory, **kw) for k, kw in settings.items()}
    tokenizer = next(iter(models.values()))[1]
    engines = {k: Engine(m, tokenizer, max_batch=1) for k, (m, _) in models.items()}
    prompt = tokenizer.encode(PROMPTS[0])
    request = lambda: GenerationRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True)
    hf = hf_models(directory, tokenizer)
    input_ids = torch.tensor([prompt])
    outputs: dict[str, list[int]] = {}

    def ours(setting: str):
        def run() -> None:
            outputs[setting] = generate_ids(engines[setting], request())
        return run

    def theirs(impl: str):
        def run() -> None:
            with torch.inference_mode():
                out = hf[impl].generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            outputs[impl] = out[0, len(prompt):].tolist()
        return run

    t = interleaved({**{k: ours(k) for k in settings}, "eager": theirs("eager"), "sdpa": theirs("sdpa")}, reps=reps)
    best = min(("eager", "sdpa"), key=t.get)
    assert all(len(outputs[k]) == tokens for k in outputs), {k: len(v) for k, v in outputs.items()}
    rows = []
    for setting in settings:
        model = models[setting][0]
        miss = first_mismatch(outputs[setting], outputs[best])
        same = "same tokens as HF" if miss is None else f"tokens differ from HF's from #{miss} (near-tied logits)"
        per_token = t[setting] / tokens
        weight_bytes = weight_bytes_per_token(model)
        gbps = weight_bytes / per_token / 1e9
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(Row(f"decode b=1, {name}, {setting} ({n_params:.1f}M) vs HF f32 generate",
                        f"{tokens / t[setting]:,.0f} tok/s ({per_token * 1e3:.2f} ms)",
                        f"{tokens / t[best]:,.0f} tok/s ({best})", t[best] / t[setting],
                        target=B1_TARGETS[name][setting],
                        note=f"{weight_bytes / 1e6:.1f} MB weights/token → {gbps:.1f} GB/s = "
                             f"{gbps / bandwidth:.0%} of the machine's {bandwidth:.0f}; {same}"))
        if setting == "int8":
            rows.append(Row(f"int8 weight bytes/s vs the machine's read ({name}, b=1)", f"{gbps:.1f} GB/s",
                            f"{bandwidth:.1f} GB/s", gbps / bandwidth, target=0.6,
                            note="int8 chosen at load: " + ", ".join(
                                f"{r} rows int8 {a:.2f} / dense {b:.2f} ms"
                                for r, (a, b) in _int8_measured(model).items())))
    return rows


def _int8_measured(model: Transformer) -> dict[int, tuple[float, float]]:
    """What the int8-vs-dense choice for decode steps was made from: whole fused steps where the
    model has them, else one pass over the matrices."""
    measured = model.kernel_choice.measured
    return measured.get("decode_step_int8") or measured.get("int8") or {}


# -- 2. KV cache vs full recompute ----------------------------------------------------------------
def cache_vs_recompute(model: Transformer, tokenizer: Tokenizer, *, context: int, tokens: int,
                       recompute_tokens: int, reps: int) -> Row:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, tokenizer.vocab_size, (context,), generator=gen).tolist()
    engine = Engine(model, tokenizer, max_batch=1, max_context=context + tokens + 1)
    cached_ids: list[int] = []

    def cached() -> float:
        events = list(engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True)))
        steps = [e for e in events if isinstance(e, Token)]
        cached_ids[:] = [e.id for e in steps]
        return (steps[-1].time - steps[0].time) / (len(steps) - 1)     # decode only, per token

    recomputed: list[int] = []

    def recompute() -> float:
        ids = list(prompt)
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(recompute_tokens):
                ids.append(int(model(torch.tensor([ids]), logits_at=-1).logits[0, -1].argmax()))
        recomputed[:] = ids[context:]
        return (time.perf_counter() - start) / recompute_tokens

    t = interleaved({"cached": cached, "recompute": recompute}, reps=reps)
    miss = first_mismatch(cached_ids[:recompute_tokens], recomputed)
    return Row(f"decode at {context} context: KV cache vs full recompute",
               f"{t['cached'] * 1e3:.2f} ms/token", f"{t['recompute'] * 1e3:.1f} ms/token",
               t["recompute"] / t["cached"], target=10.0,
               note="same tokens" if miss is None else f"tokens differ from #{miss}")


# -- 3. concurrency -------------------------------------------------------------------------------
def step_by_step(engines: dict, prompts: dict, *, steps: int, rounds: int) -> tuple[dict, dict]:
    """Decode-step seconds of `engines` taking turns step by step (the order rotating): the finest
    interleaving there is, so a burst of other load hits them all alike. Each engine decodes its
    own `prompts` (one request each, all admitted and prefilled before the timed steps) for
    `steps` steps, `rounds` times. Returns every step's seconds and the tokens, per engine."""
    times: dict = {name: [] for name in engines}
    tokens: dict = {name: [] for name in engines}
    order = list(engines)
    for _ in range(rounds):
        handles = {name: [e.submit(GenerationRequest(prompt_ids=p, max_tokens=steps + 1, ignore_eos=True))
                          for p in prompts[name]] for name, e in engines.items()}
        for e in engines.values():
            e.step()                                                # admission and prefill: not timed
        for i in range(steps):
            k = i % len(order)
            for name in order[k:] + order[:k]:
                start = time.perf_counter()
                engines[name].step()
                times[name].append(time.perf_counter() - start)
        for name, hs in handles.items():
            assert all(h.finished for h in hs), f"{name}: requests still running after {steps} steps"
            tokens[name] += [e.id for h in hs for e in h.events if isinstance(e, Token)]
    return times, tokens


def concurrency(directory: Path, settings: dict[str, dict], *, batches: tuple[int, ...], steps: int,
                rounds: int) -> tuple[dict[str, dict[int, float]], float]:
    """Aggregate decode tokens/s of each weights setting with each number of simultaneous
    requests (n / median step time; every engine takes turns step by step), and HF's static
    batch of max(batches) f32 `generate` (left-padded prompts, greedy, `steps` new tokens; prefill
    included), one HF run after each round."""
    models = {k: load_checkpoint(directory, **kw) for k, kw in settings.items()}
    tokenizer = next(iter(models.values()))[1]
    n = max(batches)
    prompts = [tokenizer.encode(f"{PROMPTS[i % 3]} {'x' * (i % 7)}") for i in range(n)]
    engines = {(k, b): Engine(m, tokenizer, max_batch=b, max_context=256)
               for k, (m, _) in models.items() for b in batches}
    hf = hf_models(directory, tokenizer)["sdpa"]
    pad, width = hf.generation_config.pad_token_id, max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])               # (n, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    times: dict = {key: [] for key in engines}
    hf_tps = []
    for _ in range(rounds):
        t, _ = step_by_step(engines, {key: prompts[: key[1]] for key in engines}, steps=steps, rounds=1)
        for key, v in t.items():
            times[key] += v
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        hf_tps.append(n * steps / (time.perf_counter() - start))
    tps = {k: {b: b / statistics.median(times[(k, b)]) for b in batches} for k in settings}
    return tps, statistics.median(hf_tps)


# -- 4. attention capture -------------------------------------------------------------------------
def capture_cost(name: str, model: Transformer, tokenizer: Tokenizer, *, tokens: int, reps: int) -> Row:
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode(PROMPTS[1])
    spec = AttentionSpec(layers="all", heads="all", include_prompt=True)

    def run(attention: AttentionSpec | None):
        def go() -> None:
            generate_ids(engine, GenerationRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True,
                                                   attention=attention))
        return go

    t = interleaved({"off": run(None), "all": run(spec)}, reps=reps)
    return Row(f"attention capture, all layers vs none ({name})",
               f"{t['all'] / tokens * 1e3:.3f} ms/token", f"{t['off'] / tokens * 1e3:.3f} ms/token",
               t["all"] / t["off"], target=1.5, higher_is_better=False)


# -- 5. capture off vs a build without the feature ------------------------------------------------
# The engine and model as shipped, minus every line that exists only for attention capture: the
# `attn_layers` / `need_weights` arguments and checks, the attentions dict, the per-row attention
# checks and layer set in the decode step, and in the fused step (model/decode_step.py) the
# capture buffers and the struct fields that point at them (its set-up is the shipped
# FusedDecode._bind). The model's shared set-up and head are the shipped methods
# (Transformer._prepare / _logits); the rest is the shipped code, copied: keep it in step with
# model/attention.py, Transformer.forward and Engine._decode (the run checks that both builds
# produce identical logits and tokens). decode.c's own capture branches (two pointer tests a
# layer) stay in both: removing them would take a second build.
class NoCaptureAttention(Attention):
    def forward(self, x, cos, sin, *, residual, mask=None, cache=None, at=None):
        B, T = cos.shape[:2]
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        q8 = self.w_qkv_int8
        qkv = dense_mm(x, self.w_qkv, self.kernels) if q8 is None else int8_mm(x, self.w_qkv, q8)
        qkv = qkv.view(B, T, nh + 2 * nkv, hs)
        qk = qkv[:, :, : nh + nkv]
        qk.copy_(apply_rope(qk, cos, sin))
        q, kv = qkv.split_with_sizes([nh, 2 * nkv], dim=2)
        q = q.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, at, kv)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = kv.transpose(1, 2).chunk(2, dim=1)
        if at is not None and T == 1 and self.kernels is not None and self.kernels.native_attention \
                and native.decode_attention_fits(q, k, v):
            out = native.bf16_decode_attention(q, k, v, at.lengths)
        else:
            out = fast_attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B * T, nh * hs)
        if (o8 := self.w_o_int8) is not None:
            return int8_mm(out, self.w_o, o8, residual)
        return dense_mm(out, self.w_o, self.kernels, residual)


class NoCaptureBlock(Block):
    def forward(self, x, cos, sin, mask, cache, at):
        x = self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, residual=x, mask=mask,
                                   cache=cache, at=at)
        return self.mlp.forward(self.post_attention_layernorm.forward(x), residual=x)


class NoCaptureFused(FusedDecode):
    def __call__(self, tokens, positions, cache, slots):
        step, logits, _ = self._bind(tokens, positions, cache, slots)
        native.decode_step(self._model, step)
        return logits.view(tokens.shape[0], 1, self.model.config.vocab_size)


class NoCaptureTransformer(Transformer):
    def forward(self, tokens, *, positions=None, cache=None, slots=None, attn_layers=(), hidden_layers=(),
                logits_at=None):
        # attn_layers, hidden_layers: accepted (the engine's prefill passes its empty ones) and ignored.
        B, T = tokens.shape
        fused = self.fused_decode
        if (fused is not None and cache is not None and T == 1 and positions is not None
                and not isinstance(logits_at, torch.Tensor) and fused.fits(B, cache)):
            return ModelOutput(fused(tokens, positions, cache, slots))
        cos, sin, mask, at = self._prepare(tokens, positions, cache, slots)
        x = self.embed_tokens(tokens.reshape(B * T))
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, at)
        return ModelOutput(self._logits(x.view(B, T, -1), logits_at))


class NoCaptureEngine(Engine):
    def _decode(self, running):
        if running == self._step_seqs:
            tokens = self._next_tokens
            self._positions += 1
        else:
            slot_ids = [s.slot for s in running]
            first, B = slot_ids[0], len(running)
            self._slots = (slice(first, first + B) if slot_ids == list(range(first, first + B))
                           else torch.tensor(slot_ids, device=self.device))
            tokens = torch.tensor([[s.last_token] for s in running], device=self.device)
            self._positions = torch.tensor([[s.length] for s in running], device=self.device)
            self._step_seqs = list(running)
        out = self.model(tokens, positions=self._positions, cache=self.cache, slots=self._slots)
        for s in running:
            s.length += 1
        sampled = self._sample(out.logits[:, -1], running)
        self._next_tokens = sampled.token_ids[:, None]
        token_ids = sampled.token_ids.tolist()
        for row, seq in enumerate(running):
            self._on_token(seq, token_ids[row], sampled, row, None)
        return [s.handle for s in running]


def without_capture(model: Transformer) -> Transformer:
    """`model` in the no-capture build: new module objects of the classes above, sharing every
    parameter and buffer with `model` (the same memory, so only the code differs)."""
    def twin_of(module: nn.Module, cls: type) -> nn.Module:
        twin = copy.copy(module)                        # shares _parameters and _buffers
        twin.__class__, twin._modules = cls, dict(module._modules)
        return twin

    twin = twin_of(model, NoCaptureTransformer)
    if model.fused_decode is not None:                  # the same structures and scratch, the twin's call
        twin.fused_decode = copy.copy(model.fused_decode)
        twin.fused_decode.__class__ = NoCaptureFused
    twin._modules["layers"] = nn.ModuleList(twin_of(block, NoCaptureBlock) for block in model.layers)
    for block in twin.layers:
        block._modules["self_attn"] = twin_of(block.self_attn, NoCaptureAttention)
    return twin


def capture_off_vs_without(model: Transformer, tokenizer: Tokenizer, *, batch: int, steps: int,
                           rounds: int) -> Row:
    twin = without_capture(model)
    prompts = [tokenizer.encode(PROMPTS[i % 3]) for i in range(batch)]
    with torch.inference_mode():                                    # the two builds agree exactly
        x = torch.tensor([prompts[0]])
        assert torch.equal(model(x).logits, twin(x).logits)
    engines = {"shipped": Engine(model, tokenizer, max_batch=batch),
               "shipped again": Engine(model, tokenizer, max_batch=batch),
               "without": NoCaptureEngine(twin, tokenizer, max_batch=batch)}
    times, tokens = step_by_step(engines, dict.fromkeys(engines, prompts), steps=steps, rounds=rounds)
    assert tokens["shipped"] == tokens["without"], "the no-capture build generated different tokens"
    t = {name: statistics.median(v) for name, v in times.items()}
    aa = max(t["shipped"], t["shipped again"]) / min(t["shipped"], t["shipped again"])
    return Row(f"capture off vs build without it, shipped b={batch}",
               f"{t['shipped'] * 1e3:.3f} ms/step", f"{t['without'] * 1e3:.3f} ms/step",
               t["shipped"] / t["without"], target=1.03, higher_is_better=False,
               note=f"A/A noise this run: {aa:.3f}×")


# -- 6. logit lens while generating ----------------------------------------------------------------
def lens_cost(name: str, model: Transformer, tokenizer: Tokenizer, *, tokens: int, reps: int) -> Row:
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode(PROMPTS[1])
    spec = LensSpec(layers="all", top_k=5, include_prompt=True)

    def run(lens: LensSpec | None):
        def go() -> None:
            generate_ids(engine, GenerationRequest(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True, lens=lens))
        return go

    t = interleaved({"off": run(None), "all": run(spec)}, reps=reps)
    return Row(f"logit lens, all layers vs none ({name})",
               f"{t['all'] / tokens * 1e3:.3f} ms/token", f"{t['off'] / tokens * 1e3:.3f} ms/token",
               t["all"] / t["off"], target=1.5, higher_is_better=False)


# -- 7. analyze vs a 1-token generation -----------------------------------------------------------
def analyze_cost(name: str, model: Transformer, tokenizer: Tokenizer, ids: list[int], *, reps: int) -> Row:
    engine = Engine(model, tokenizer, max_batch=1, max_context=max(len(ids), 2))
    def analyze() -> None:
        engine.analyze(AnalysisRequest(ids=ids, logprobs=5))

    def generate() -> None:
        generate_ids(engine, GenerationRequest(prompt_ids=ids, max_tokens=1, logprobs=5))

    t = interleaved({"analyze": analyze, "generate": generate}, reps=reps)
    return Row(f"analyze vs 1-token generation, {len(ids)} tokens ({name})",
               f"{t['analyze'] * 1e3:.2f} ms", f"{t['generate'] * 1e3:.2f} ms",
               t["analyze"] / t["generate"], target=1.5, higher_is_better=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run: fewer tokens and repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    reps = 2 if quick else 7
    print(describe_machine(args.threads), "— quick run" if quick else "")
    rows: list[Row] = []
    started = time.perf_counter()

    def report(row: Row) -> None:
        rows.append(row)
        print(f"  [{time.perf_counter() - started:4.0f} s] {row.measurement}: {row.ours} vs {row.baseline} "
              f"→ {row.ratio:.2f}× {row.note}", flush=True)

    with tempfile.TemporaryDirectory(prefix="attnserve-bench-") as tmp:
        lines = 3000 if quick else 20000
        small_dir = random_checkpoint(Path(tmp) / "small", "small", vocab_size=4096, seed=1, text_lines=lines)
        bench_dir = random_checkpoint(Path(tmp) / "bench", "bench", vocab_size=8192, seed=2, text_lines=lines)
        print(f"  [{time.perf_counter() - started:4.0f} s] built the random-weight checkpoints", flush=True)

        bandwidth, buffer = stream_read_gbps()
        print(f"  [{time.perf_counter() - started:4.0f} s] machine: streaming read {bandwidth:.1f} GB/s "
              f"(torch.sum over {buffer / 2**20:,.0f} MB; L3 {l3_bytes() / 2**20:,.0f} MB)", flush=True)
        n = 16 if quick else 128
        for name, directory in (("shipped", SHIPPED), ("small", small_dir)):
            for row in decode_vs_hf(name, directory, {"float32": SETTINGS["float32"]}, tokens=n, reps=reps,
                                    bandwidth=bandwidth):
                report(row)
        for row in decode_vs_hf("bench", bench_dir, SETTINGS, tokens=n, reps=reps, bandwidth=bandwidth):
            report(row)

        bench_model, bench_tok = load_checkpoint(bench_dir)
        report(cache_vs_recompute(bench_model, bench_tok, context=512 if quick else 1024, tokens=8 if quick else 64,
                                  recompute_tokens=1 if quick else 3, reps=1 if quick else 3))

        tps, hf32 = concurrency(bench_dir, SETTINGS, batches=(1, 16, 32), steps=8 if quick else 64,
                                rounds=1 if quick else 3)
        fastest = max(tps, key=lambda k: tps[k][32])
        each = "; ".join(f"{k}: b=1 {v[1]:,.0f}, 16 {v[16]:,.0f} ({v[16] / v[1]:.1f}×), "
                         f"32 {v[32]:,.0f} tok/s ({v[32] / hf32:.1f}× HF)" for k, v in tps.items())
        report(Row(f"16 concurrent vs 1 (bench, {fastest}), aggregate", f"{tps[fastest][16]:,.0f} tok/s",
                   f"{tps[fastest][1]:,.0f} tok/s", tps[fastest][16] / tps[fastest][1], target=6.0,
                   note="decode steps (prefill not timed)"))
        report(Row(f"32 sequences vs HF static batch-32 f32 (bench, fastest: {fastest})",
                   f"{tps[fastest][32]:,.0f} tok/s", f"{hf32:,.0f} tok/s", tps[fastest][32] / hf32, target=3.5,
                   note=each))

        shipped_model, shipped_tok = load_checkpoint(SHIPPED)
        report(capture_cost("shipped", shipped_model, shipped_tok, tokens=n, reps=reps))
        report(capture_cost("bench", bench_model, bench_tok, tokens=n // 2, reps=reps))
        for batch in (1, 16):
            report(capture_off_vs_without(shipped_model, shipped_tok, batch=batch, steps=60 if quick else 400,
                                          rounds=1 if quick else 3))
        report(lens_cost("shipped", shipped_model, shipped_tok, tokens=n, reps=reps))
        report(lens_cost("bench", bench_model, bench_tok, tokens=n // 2, reps=reps))
        report(analyze_cost("shipped", shipped_model, shipped_tok, shipped_tok.encode(PROMPTS[1]), reps=reps * 3))
        text = torch.randint(3, bench_tok.vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()
        report(analyze_cost("bench", bench_model, bench_tok, [bench_tok.bos_id, *text], reps=reps))
    print()
    print_table(rows)
    print(f"\n{sum(r.passed for r in rows)}/{len(rows)} targets met; ran {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

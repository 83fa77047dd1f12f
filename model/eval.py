"""Held-out evaluation of a checkpoint, for the corpus its model card names.

    python -m model.eval checkpoints/calculator     # greedy exact match on the held-out problems
    python -m model.eval checkpoints/pronouns       # exact match and the attention probe
    python -m model.eval checkpoints/calculator --dtype bfloat16 --quantization int8

Greedy exact match: the completion up to end-of-sequence must equal the expected one exactly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from model.checkpoint import load_checkpoint
from model.data import calculator_split
from model.probe import attention_probe, best_head_line, probe_table
from model.pronouns import pronoun_split
from model.quantization import DTYPE_CHOICES, KV_CACHE_DTYPES, QUANTIZATIONS, resolve_kv_cache_dtype, weights_info
from model.tokenizer import Tokenizer
from model.transformer import Transformer

MAX_ANSWER_TOKENS = 8  # "one hundred ninety eight" is 4 word tokens; leave room for EOS and slack
HELD_OUT_CORPORA = ("calculator", "pronouns")


class Task(Protocol):
    """A held-out item: a prompt and the exact completion expected (calculator or pronoun problem)."""
    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...


@torch.inference_mode()
def greedy_answers(model: Transformer, tokenizer: Tokenizer, prompts: list[str], *,
                   max_new_tokens: int = MAX_ANSWER_TOKENS, batch_size: int = 256,
                   kv_cache_dtype: torch.dtype | None = None) -> list[str]:
    """Greedy completions, batched over prompts of equal token length through the KV cache
    (in `kv_cache_dtype`, default the compute dtype)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    answers: list[str] = [""] * len(prompts)
    by_length = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    cache = model.new_cache(batch_size, max_context=max(map(len, encoded)) + max_new_tokens, dtype=kv_cache_dtype)
    for _, group in itertools.groupby(by_length, key=lambda i: len(encoded[i])):
        group = list(group)
        for start in range(0, len(group), batch_size):
            rows = group[start: start + batch_size]
            tokens = torch.tensor([encoded[i] for i in rows])                      # (B, T)
            for row, ids in zip(rows, _greedy(model, cache, tokens, max_new_tokens, tokenizer.eos_id)):
                answers[row] = tokenizer.decode(ids)
    return answers


def _greedy(model: Transformer, cache, tokens: torch.Tensor, max_new_tokens: int, eos_id: int | None):
    B, T = tokens.shape
    slots = slice(0, B)
    positions = torch.arange(T).expand(B, T)
    logits = model(tokens, positions=positions, cache=cache, slots=slots, logits_at=-1).logits
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)                                              # (B,)
        for row in range(B):
            if not done[row] and nxt[row] != eos_id:
                out[row].append(int(nxt[row]))
        done |= nxt == eos_id
        if done.all() or step == max_new_tokens - 1:
            break
        positions = torch.full((B, 1), T + step)
        logits = model(nxt[:, None], positions=positions, cache=cache, slots=slots).logits
    return out


def held_out_accuracy(model: Transformer, tokenizer: Tokenizer, problems: Sequence[Task] | None = None, *,
                      kv_cache_dtype: torch.dtype | None = None) -> tuple[float, list[tuple[Task, str]]]:
    """Exact-match accuracy and the (problem, wrong answer) pairs; the calculator's held-out
    problems unless `problems` are given."""
    problems = problems if problems is not None else calculator_split()[2]
    answers = greedy_answers(model, tokenizer, [p.prompt for p in problems], kv_cache_dtype=kv_cache_dtype)
    wrong = [(p, a) for p, a in zip(problems, answers) if a != p.completion]
    return 1 - len(wrong) / len(problems), wrong


def held_out_problems(corpus: str) -> list[Task]:
    if corpus == "calculator":
        return calculator_split()[2]
    if corpus == "pronouns":
        return pronoun_split()[2]
    raise ValueError(f"corpus {corpus!r} has no held-out set; corpora with one: {', '.join(HELD_OUT_CORPORA)}")


def evaluate(model: Transformer, tokenizer: Tokenizer, corpus: str, *,
             kv_cache_dtype: torch.dtype | None = None) -> tuple[dict, list[tuple[Task, str]]]:
    """The card's metrics for `corpus`: held-out exact match (and, for pronouns, the attention
    probe over the same held-out prompts), and the wrong answers."""
    problems = held_out_problems(corpus)
    accuracy, wrong = held_out_accuracy(model, tokenizer, problems, kv_cache_dtype=kv_cache_dtype)
    metrics = {"held_out_exact_match": accuracy, "held_out_wrong": len(wrong)}
    if corpus == "pronouns":
        metrics["attention_probe"] = attention_probe(model, tokenizer, problems)
    return metrics, wrong


def card_corpus(directory: str | Path) -> str:
    """The corpus a checkpoint was trained on, from its model_card.json."""
    path = Path(directory) / "model_card.json"
    if not path.is_file():
        raise SystemExit(f"{directory} has no model_card.json: pass --corpus ({', '.join(HELD_OUT_CORPORA)})")
    return json.loads(path.read_text())["corpus"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory")
    parser.add_argument("--corpus", choices=HELD_OUT_CORPORA, default=None,
                        help="the task to evaluate (default: the corpus named in the model card)")
    parser.add_argument("--show-errors", type=int, default=10, help="print up to N wrong answers (default: 10)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="compute dtype (default float32: the exact reference)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="int8: weight-only")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="auto: the compute dtype")
    args = parser.parse_args(argv)
    corpus = args.corpus or card_corpus(args.checkpoint)
    if corpus not in HELD_OUT_CORPORA:
        raise SystemExit(f"{args.checkpoint} was trained on corpus {corpus!r}, which has no held-out task "
                         f"(those with one: {', '.join(HELD_OUT_CORPORA)})")
    model, tokenizer = load_checkpoint(args.checkpoint, dtype=args.dtype, quantization=args.quantization)
    kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, model.embed_tokens.weight.dtype)
    info = weights_info(model)
    print(f"weights: {info['dtype']}, quantization {info['quantization']}, KV cache "
          f"{str(kv_dtype).removeprefix('torch.')}; kernels {info['kernels']}")
    start = time.perf_counter()
    metrics, wrong = evaluate(model, tokenizer, corpus, kv_cache_dtype=kv_dtype)
    for p, got in wrong[: args.show_errors]:
        print(f"  wrong: {p.prompt!r} → {got!r} (expected {p.completion!r})")
    n = len(held_out_problems(corpus))
    print(f"held-out exact match ({corpus}): {metrics['held_out_exact_match']:.2%} "
          f"({n - metrics['held_out_wrong']}/{n}, greedy, {time.perf_counter() - start:.1f} s)")
    if "attention_probe" in metrics:
        probe = metrics["attention_probe"]
        print("attention probe: mean attention weight over the held-out prompts")
        print("\n".join(probe_table(probe)))
        print(best_head_line(probe))


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: interleaved A/B timing, random-weight checkpoints, the table.

Timing on a shared machine: every comparison runs its contenders in turn, repetition after
repetition (A B A B …), and compares medians, so a burst of load from elsewhere hits both sides.
A ratio measured that way in one run is the number to trust; absolute times are only context.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.tokenizer import Tokenizer
from model.transformer import Transformer

# A contender is called once per repetition and returns the seconds to count (so it can leave its
# own setup out), or None to be timed whole.
Contender = Callable[[], float | None]


def interleaved(contenders: dict[str, Contender], *, reps: int, warmup: int = 1,
                stat: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Seconds of each contender over `reps` interleaved repetitions (after `warmup`), summarised
    by `stat`: the median, or the min where the question is the cost of the code itself (other
    load only ever adds time)."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(warmup + reps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            counted = fn()
            elapsed = time.perf_counter() - start if counted is None else counted
            if rep >= warmup:
                samples[name].append(elapsed)
    return {name: stat(s) for name, s in samples.items()}


def synthetic_text(n_lines: int, *, seed: int = 0) -> list[str]:
    """Lines of pseudo-words (syllable soup): enough distinct pairs to train a BPE of a few
    thousand tokens in about a second."""
    rng = random.Random(seed)
    onsets, vowels, codas = "bcdfghjklmnprstvwz", "aeiou", ["", "n", "r", "s", "t", "l", "ng", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(6000)]
    weights = [1 / (i + 1) for i in range(len(words))]                   # Zipf-like frequencies
    return [" ".join(rng.choices(words, weights, k=rng.randint(6, 16))) for _ in range(n_lines)]


def random_checkpoint(directory: Path, preset_name: str, *, vocab_size: int, seed: int = 0,
                      text_lines: int = 20000, **overrides) -> Path:
    """A random-weight model of a named preset and a BPE tokenizer trained on synthetic text,
    saved as an HF Llama checkpoint directory (so transformers loads the very same weights).
    The tokenizer may have fewer tokens than the model's vocab_size (less text, fewer merges);
    every id it makes is valid."""
    tokenizer = Tokenizer.train_bpe(synthetic_text(text_lines, seed=seed), vocab_size=vocab_size)
    config = preset(preset_name, vocab_size=vocab_size, bos_token_id=tokenizer.bos_id,
                    eos_token_id=tokenizer.eos_id, pad_token_id=0, **overrides)
    model = Transformer(config)
    model.init_weights(seed=seed)
    return save_checkpoint(model, tokenizer, directory)


@dataclass
class Row:
    """One line of the results table. `higher_is_better` says which way the target points."""

    measurement: str
    ours: str
    baseline: str
    ratio: float
    target: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target


def print_table(rows: list[Row]) -> None:
    headers = ("measurement", "ours", "baseline", "ratio", "target", "")
    cells = [(r.measurement, r.ours, r.baseline, f"{r.ratio:.2f}×",
              f"{'≥' if r.higher_is_better else '≤'} {r.target:g}×", "PASS" if r.passed else "FAIL")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row, c in zip(rows, cells):
        print(line(c) + (f"   {row.note}" if row.note else ""))


def describe_machine(threads: int) -> str:
    import os
    import platform
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {threads} thread(s) of {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}, load average {load:.2f}")

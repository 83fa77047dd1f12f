"""Training corpora: the word calculator (generated in code) and any UTF-8 text file.

The calculator is the project's origin: "two plus three equals five". To predict "five", the
token after "equals" must gather both numbers — exactly what attention is for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
OPS = ("plus", "minus")
MAX_OPERAND = 99


def number_words(n: int) -> str:
    """0 … 999 in words: 42 → "forty two", 198 → "one hundred ninety eight"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0 … 999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + ("" if rest == 0 else " " + number_words(rest))


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "plus" else self.a - self.b

    @property
    def prompt(self) -> str:
        return f"{number_words(self.a)} {self.op} {number_words(self.b)} equals"

    @property
    def completion(self) -> str:
        return " " + number_words(self.answer)

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def is_held_out(a: int, b: int) -> bool:
    """The fixed, public held-out rule: (a, op, b) never appears in training iff this holds."""
    return (7 * a + 3 * b) % 11 == 5


def all_problems() -> list[Problem]:
    """Every problem: a, b in 0 … 99; plus always, minus only where the answer is ≥ 0."""
    return [Problem(a, op, b)
            for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) for op in OPS
            if op == "plus" or a >= b]


def calculator_split(*, val_size: int = 500, seed: int = 0) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, validation, held_out). Validation is a seeded slice of the non-held-out problems."""
    held_out = [p for p in all_problems() if is_held_out(p.a, p.b)]
    rest = [p for p in all_problems() if not is_held_out(p.a, p.b)]
    random.Random(seed).shuffle(rest)
    return rest[val_size:], rest[:val_size], held_out


def calculator_examples() -> list[dict[str, str]]:
    """Prompts for the viewer: the origin's example, then held-out problems (never trained on)."""
    held_out = [Problem(42, "minus", 21), Problem(57, "plus", 41), Problem(81, "minus", 7), Problem(64, "plus", 98)]
    return [{"prompt": p.prompt, "completion": p.completion} for p in [Problem(2, "plus", 3), *held_out]]


def read_text_corpus(path: str | Path, *, val_fraction: float = 0.05) -> tuple[str, str]:
    """(train_text, val_text) from a UTF-8 file: the last `val_fraction` is validation."""
    text = Path(path).read_text(encoding="utf-8")
    if len(text) < 100:
        raise ValueError(f"{path}: {len(text)} characters is too little text to train on")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


class SequenceBatches:
    """Random batches of whole, padded sequences (calculator and pronoun problems): (inputs, targets).

    Each sequence is BOS + text + EOS. Targets are the inputs shifted by one; padding targets
    are -100 so the loss ignores them, and so are the prompt's when `loss_from` gives each
    sequence's first counted token (its completion's).
    """

    def __init__(self, sequences: list[list[int]], *, batch_size: int, pad_id: int, seed: int,
                 loss_from: list[int] | None = None):
        self.sequences, self.batch_size, self.pad_id, self.loss_from = sequences, batch_size, pad_id, loss_from
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        picks = torch.randint(len(self.sequences), (self.batch_size,), generator=self.gen).tolist()
        starts = [self.loss_from[i] for i in picks] if self.loss_from is not None else None
        return pad_batch([self.sequences[i] for i in picks], self.pad_id, starts)


class WindowBatches:
    """Random fixed-length windows of one long token stream (the text corpus)."""

    def __init__(self, ids: list[int], *, batch_size: int, block_size: int, seed: int):
        if len(ids) <= block_size + 1:
            raise ValueError(f"corpus has {len(ids)} tokens, fewer than block_size + 2 = {block_size + 2}")
        self.data, self.batch_size, self.block_size = torch.tensor(ids), batch_size, block_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.gen)
        windows = torch.stack([self.data[s: s + self.block_size + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def pad_batch(sequences: list[list[int]], pad_id: int, loss_from: list[int] | None = None
              ) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of whole sequences, padded to the longest. With `loss_from`, only the
    targets from each sequence's token loss_from[row] on count (the ones before are -100)."""
    T = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), T), -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        first = loss_from[row] - 1 if loss_from is not None else 0    # target k is token k + 1
        inputs[row, : len(s) - 1] = torch.tensor(s[:-1])
        targets[row, first: len(s) - 1] = torch.tensor(s[1 + first:])
    return inputs, targets

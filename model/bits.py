"""Bits per byte: a language model's loss that does not depend on its tokenizer.

Cross-entropy per token (nats) depends on how much text a token holds. Bits per byte is the same
total cost spread over the UTF-8 bytes of the text instead:

    bpb = Σ loss (nats) / (ln 2 · Σ bytes) = mean loss per token · tokens / bytes / ln 2

Special tokens (end of sequence) hold no bytes but their cost counts: it is part of the text's code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.tokenizer import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer) -> Tensor:
    """(V,) the number of UTF-8 bytes each token id stands for; 0 for special tokens."""
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    byte_level = type(tokenizer.hf.pre_tokenizer).__name__ == "ByteLevel"
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_special(i):
            continue
        # A byte-level token's string has one character per byte (GPT-2's byte alphabet).
        piece = tokenizer.hf.id_to_token(i) or ""
        lengths[i] = len(piece) if byte_level else len(tokenizer.token_text(i).encode("utf-8"))
    return lengths


def bits_per_byte(mean_loss: float, targets: Tensor, byte_lengths: Tensor) -> float:
    """`mean_loss` (nats per counted target token, padding targets -100 not counted) over `targets`
    → bits per byte of the text those targets spell."""
    counted = targets[targets != -100]
    n_bytes = int(byte_lengths[counted].sum())
    if n_bytes == 0:
        raise ValueError(f"the {counted.numel()} target tokens hold no bytes: bits per byte is undefined")
    return mean_loss * counted.numel() / (n_bytes * math.log(2))


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)

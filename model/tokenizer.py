"""Tokenizer: a thin wrapper over HF `tokenizers` (tokenizer.json).

We train byte-level BPE tokenizers (GPT-2 style): every UTF-8 string encodes, nothing is ever
unknown, and a word's leading space belongs to its token (" five"). Checkpoints from elsewhere
(e.g. a SentencePiece-converted Llama tokenizer.json) load through the same class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in tokenizers we train

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """Text ⇄ token ids, with the special-token facts the rest of attnserve needs."""

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None):
        self.hf = hf
        # User text that spells a special token ("<|eos|>") stays text: it must never become the
        # control token itself.
        self.hf.encode_special_tokens = True
        self.bos_id = _token_id(hf, bos_token, (BOS, "<s>", "<|begin_of_text|>"))
        self.eos_id = _token_id(hf, eos_token, (EOS, "</s>", "<|end_of_text|>", "<|eot_id|>"))
        self.chat_template = chat_template
        self._special_ids = frozenset(
            i for i, tok in hf.get_added_tokens_decoder().items() if tok.special)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], *, vocab_size: int,
                  show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer whose encodings start with BOS."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, hf.token_to_id(BOS))]
        )
        return cls(hf, bos_token=BOS, eos_token=EOS)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        hf = HFTokenizer.from_file(str(path))
        cfg = {}
        if (directory / TOKENIZER_CONFIG_FILE).is_file():
            cfg = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text())
        return cls(hf, bos_token=_token_str(cfg.get("bos_token")),
                   eos_token=_token_str(cfg.get("eos_token")),
                   chat_template=cfg.get("chat_template"))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that `transformers` understands."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token_text(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.token_text(self.eos_id) if self.eos_id is not None else None,
            "pad_token": PAD if self.hf.token_to_id(PAD) is not None else None,
            "add_bos_token": False,  # tokenizer.json's post-processor already adds it
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, BOS first. Text spelling a special token ("<|eos|>") stays text
        unless parse_special (for text a chat template rendered, as HF does)."""
        if parse_special:
            self.hf.encode_special_tokens = False
            try:
                ids = self.hf.encode(text, add_special_tokens=False).ids
            finally:
                self.hf.encode_special_tokens = True
        else:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own (for display): " five", "<|bos|>"."""
        if self.is_special(token_id):
            return self.hf.id_to_token(token_id) or ""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _token_id(hf: HFTokenizer, explicit: str | None, candidates: tuple[str, ...]) -> int | None:
    for token in (explicit, *candidates):
        if token is not None and (token_id := hf.token_to_id(token)) is not None:
            return token_id
    return None


def _token_str(value: object) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None

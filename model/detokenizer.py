"""Incremental detokenization: token ids in, text deltas out, never half a character.

Decoding each new token on its own is wrong twice over: a character may span several tokens
(byte-level BPE fragments, SentencePiece byte-fallback tokens like <0xE2>), and SentencePiece
decoders strip the leading space of the *first* token ("▁world" alone decodes to "world").
TGI's answer, used here: decode a short window of recent ids whose first token (the prefix,
TGI's `prefix_offset`) was already emitted, and emit only what lies past the text already out
(TGI's `read_offset`, kept here as a character count). Text that may still change is withheld:

- a final U+FFFD: lossy UTF-8 decoding only ever revises a trailing, unfinished sequence (at
  most 3 bytes, so within the last 3 tokens); everything before the last character is final;
- a run of byte-fallback tokens: `ByteFallback` decodes a run as a whole and turns *every*
  byte of it into U+FFFD if any byte is invalid (<E2><82><AC><80> → "����", not "€�"), so no
  part of a run is final until a normal token ends it.

So the deltas always add up to `tokenizer.decode(ids)`, and each call decodes at most a few
tokens plus the current byte-fallback run: O(1) amortised. (`tokenizers.decoders.DecodeStream`
does the same job but raises on the invalid-run case above and has no flush.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what lossy decoding shows for bytes that are not (yet) a character
OPEN_TAIL_TOKENS = 3  # an unfinished UTF-8 sequence is <= 3 bytes, so it lies in <= 3 tokens


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas that are always whole characters.

    `prompt_ids` are context only: the generation's first token is decoded as it follows the
    prompt (SentencePiece keeps its leading space: "Hello" + " world"), and the prompt's own
    text is not emitted. Contract, for any generated `ids`:

        "".join(d.push(i) for i in ids) + d.flush()
            == tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]

    which with no prompt (or with any prompt under byte-level BPE) is `tokenizer.decode(ids)`.
    This assumes the generation does not change the prompt's own text, which it could only do
    by finishing an unfinished character the prompt ends in (no `encode` output does), or by
    extending a byte-fallback run the prompt ends in with invalid bytes.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._byte_ids = byte_fallback_ids(tokenizer)
        # The window starts at the prompt's last normal token (or at the start of the byte run
        # it ends with), so the first generated token is never the one a decoder strips.
        context = [i for i in prompt_ids if not self._skipped(i)]
        start = len(context) - 1
        while start > 0 and context[start] in self._byte_ids:
            start -= 1
        self._window: list[int] = context[max(start, 0):]  # ids from TGI's prefix_offset on
        self._done = len(tokenizer.decode(self._window))  # chars of the window's text already out
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is open)."""
        if self._skipped(token_id):
            return ""  # decode drops it too, so it can neither add text nor end a byte run
        self._window.append(token_id)
        if token_id in self._byte_ids:
            return ""  # nothing in a byte-fallback run is final until the run ends
        text = self.tokenizer.decode(self._window)
        if text.endswith(REPLACEMENT):
            # The last character may still be an unfinished UTF-8 sequence: hold it back.
            delta = text[self._done:-1]
            held = len(text) - max(self._done, len(text) - 1)  # chars still to come out: 1 or 0
            if len(self._window) > OPEN_TAIL_TOKENS:
                # Keep only the tokens that can hold the open sequence. Their decode may start
                # differently (a cut character shows as U+FFFD) but that part is final and
                # counted as out; from the open sequence on it matches the longer window.
                self._window = self._window[-OPEN_TAIL_TOKENS:]
                text = self.tokenizer.decode(self._window)
            self._done = len(text) - held
        else:
            # All final: the last token becomes the prefix of the next window.
            delta = text[self._done:]
            self._window = self._window[-1:]
            self._done = len(self.tokenizer.decode(self._window))
        return self._emit(delta)

    def flush(self) -> str:
        """At the end of generation: release what is held back, as the full decode shows it."""
        text = self.tokenizer.decode(self._window)
        delta = text[self._done:]
        self._done = len(text)
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta

    def _skipped(self, token_id: int) -> bool:
        """Ids that `decode` drops: special tokens and ids outside the vocabulary."""
        return self.tokenizer.is_special(token_id) or self.tokenizer.hf.id_to_token(token_id) is None


@functools.lru_cache(maxsize=8)        # asked once per request: 256 vocabulary lookups each time
def byte_fallback_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte tokens <0x00>..<0xFF>; none in a byte-level BPE vocabulary."""
    ids = (tokenizer.hf.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None and not tokenizer.is_special(i))

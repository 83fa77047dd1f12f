"""IncrementalDetokenizer: deltas add up to the full decode, never show half a character, and
each push decodes only a few tokens. Checked on our byte-level BPE and on a SentencePiece-style
(Llama) tokenizer with byte fallback, both built here from a few lines of text."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from model.detokenizer import IncrementalDetokenizer, byte_fallback_ids
from model.tokenizer import SPECIAL_TOKENS, Tokenizer

FAST = settings(max_examples=200, deadline=None)

TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Café crème brûlée à la mode — naïve façade, Ærø, Øresund.",
    "你好，世界。東京は晴れ。한국어 텍스트.",
    "emoji 🙂🎉👍🏽 and ünïcödé, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!",
    "Ελληνικά και русский текст; مرحبا بالعالم.",
]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def sentencepiece_style() -> Tokenizer:
    """A Llama-like tokenizer.json: a Unigram model with byte fallback, Metaspace "▁", and HF's
    converted-Llama decoder (whose Strip drops the first token's leading space). Built by hand,
    not trained, so it is the same on every run; characters not listed (你, 🙂, Greek, Cyrillic,
    Arabic, Hangul) come out as byte tokens like <0xE4><0xBD><0xA0>."""
    chars = "▁" + string.ascii_letters + string.digits + string.punctuation + "éèàçüöï—，。好世界"
    words = {w.strip(string.punctuation) for t in TEXTS[:2] for w in t.split()} | {"東京", "は晴れ"}
    # Scores are log-probabilities: a whole word beats spelling it out, so words are used.
    pieces = [(p, 0.0) for p in SP_SPECIALS] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + w, -1.0) for w in sorted(words) if w]
    hf = HFTokenizer(models.Unigram(list(dict(pieces).items()), unk_id=0, byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(SP_SPECIALS)
    return Tokenizer(hf)


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS * 3, vocab_size=420)


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    tok = sentencepiece_style()
    assert len(byte_fallback_ids(tok)) == 256 and tok.bos_id == 1 and tok.eos_id == 2
    assert any(i in byte_fallback_ids(tok) for i in tok.encode(TEXTS[2])), "no byte fallback used"
    return tok


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def hard_ids(tok: Tokenizer) -> list[int]:
    """Specials, byte tokens and pieces of a character: the ids that decode alone gets wrong."""
    return [i for i in range(tok.vocab_size)
            if tok.is_special(i) or "\ufffd" in tok.hf.decode([i])]


def token_ids(tok: Tokenizer) -> st.SearchStrategy[int]:
    """Any id, often a hard one."""
    return st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(hard_ids(tok)))


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | tuple = ()) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.push(i) for i in ids] + [detok.flush()]


def final_text(tok: Tokenizer, ids: list[int]) -> str:
    """What no further id can change: the decode up to the last normal token (so not inside
    a byte-fallback run), less a trailing U+FFFD that may be an unfinished character."""
    byte_ids = byte_fallback_ids(tok)
    normal = [k for k, i in enumerate(ids) if not tok.is_special(i) and i not in byte_ids]
    text = tok.decode(ids[:normal[-1] + 1]) if normal else ""
    return text.removesuffix("\ufffd")


# -- the contract on random ids ---------------------------------------------------------------
@FAST
@given(data=st.data())
def test_deltas_add_up_to_the_full_decode(tok, data):
    ids = data.draw(st.lists(token_ids(tok), max_size=40))
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok)
    for k, i in enumerate(ids, start=1):
        detok.push(i)
        # Never ahead of the full decode (no half character shown early), never behind what is
        # already final (no needless holding back).
        assert full.startswith(detok.text), (ids[:k], detok.text, full)
        assert detok.text == final_text(tok, ids[:k]), ids[:k]
    detok.flush()
    assert detok.text == full, ids


@FAST
@given(data=st.data())
def test_prompt_is_context_not_output(tok, data):
    prompt = tok.encode(data.draw(st.sampled_from(["Hello world", "Café crème", "Hello"])))
    ids = data.draw(st.lists(token_ids(tok), max_size=30))
    before, after = tok.decode(prompt), tok.decode(prompt + ids)
    assert after.startswith(before)
    assert "".join(stream(tok, ids, prompt)) == after[len(before):]


@FAST
@given(data=st.data())
def test_byte_level_ignores_the_prompt(byte_level, data):
    prompt = byte_level.encode(data.draw(st.sampled_from(TEXTS)))
    ids = data.draw(st.lists(token_ids(byte_level), max_size=30))
    assert "".join(stream(byte_level, ids, prompt)) == byte_level.decode(ids)


# -- round trips ------------------------------------------------------------------------------
def no_special_tokens(text: str) -> bool:
    """encode turns "<s>" in the text into the special token, which decode then drops."""
    return not any(s in text for s in (*SPECIAL_TOKENS, *SP_SPECIALS))


@FAST
@given(text=st.text(max_size=40).filter(no_special_tokens) | st.sampled_from(TEXTS))
def test_round_trip_byte_level(byte_level, text):
    ids = byte_level.encode(text)
    assert byte_level.decode(ids) == text
    assert "".join(stream(byte_level, ids)) == text


# Metaspace cannot round-trip a leading space or a literal "▁" (both are how it marks spaces).
sp_text = st.text(st.characters(exclude_characters="▁", exclude_categories=("Cs",)), max_size=40)


@FAST
@given(text=sp_text.filter(lambda t: not t.startswith(" ") and no_special_tokens(t))
       | st.sampled_from(TEXTS))
def test_round_trip_sentencepiece(sentencepiece, text):
    ids = sentencepiece.encode(text)
    assert sentencepiece.decode(ids) == text
    assert "".join(stream(sentencepiece, ids)) == text


# -- the cases by hand --------------------------------------------------------------------------
def byte_level_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, through the byte-level alphabet ("€" → "â", "Ĥ", "¬")."""
    chars = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    mapped = "".join(s for s, _ in chars.pre_tokenize_str(text))
    return [tok.hf.token_to_id(c) for c in mapped]


def test_a_character_split_over_tokens_comes_out_whole(byte_level):
    euro = byte_level_ids(byte_level, "€")
    assert len(euro) == 3 and all(i is not None for i in euro)
    assert stream(byte_level, euro) == ["", "", "€", ""]
    eos = byte_level.eos_id  # a special token inside the character is dropped, as by decode
    assert stream(byte_level, [euro[0], eos, *euro[1:]]) == ["", "", "", "€", ""]


def test_invalid_bytes_come_out_as_decode_shows_them(byte_level):
    euro = byte_level_ids(byte_level, "€")
    a = byte_level.hf.token_to_id("a")
    # A lead byte then "a": the lead byte can no longer complete.
    assert stream(byte_level, [euro[0], a]) == ["", "\ufffda", ""]
    # An unfinished character at the end is only settled by flush.
    assert stream(byte_level, [a, *euro[:2]]) == ["a", "", "", "\ufffd"]


def test_sentencepiece_keeps_spaces_between_tokens(sentencepiece):
    ids = sentencepiece.encode("Hello world, the", add_bos=False)
    assert [sentencepiece.hf.id_to_token(i) for i in ids] == ["▁Hello", "▁world", ",", "▁the"]
    # Decoded one by one, each would lose its space; only the first one should.
    assert stream(sentencepiece, ids) == ["Hello", " world", ",", " the", ""]


def test_sentencepiece_prompt_keeps_the_first_space(sentencepiece):
    world = sentencepiece.encode(" world", add_bos=False)
    assert sentencepiece.decode(world) == "world"  # the decoder strips the first space...
    prompt = sentencepiece.encode("Hello")
    assert "".join(stream(sentencepiece, world, prompt)) == " world"  # ...unless there is a prompt


def test_byte_fallback_run_is_held_until_it_ends(sentencepiece):
    b = {x: sentencepiece.hf.token_to_id(f"<0x{x:02X}>") for x in range(256)}
    the = sentencepiece.hf.token_to_id("▁the")
    assert the is not None
    # "你" as three byte tokens: released by the next normal token, or by flush.
    ni = [b[0xE4], b[0xBD], b[0xA0]]
    assert stream(sentencepiece, [*ni, the]) == ["", "", "", "你 the", ""]
    assert stream(sentencepiece, ni) == ["", "", "", "你"]
    # A bad byte makes ByteFallback show the *whole* run as U+FFFD: "€" must not go out early.
    euro_bad = [b[0xE2], b[0x82], b[0xAC], b[0x80]]
    assert sentencepiece.decode([*euro_bad, the]) == "\ufffd" * 4 + " the"
    assert stream(sentencepiece, [*euro_bad, the]) == ["", "", "", "", "\ufffd" * 4 + " the", ""]


def test_unknown_ids_are_skipped_like_decode_does(sentencepiece):
    hello, world = sentencepiece.encode("Hello world", add_bos=False)[-2:]
    unknown = sentencepiece.vocab_size + 5
    ids = [hello, unknown, world]
    assert "".join(stream(sentencepiece, ids)) == sentencepiece.decode(ids)


def test_each_push_decodes_a_few_tokens(tok, monkeypatch):
    """O(1) amortised: count the ids passed to decode over a long random stream."""
    rng = random.Random(0)
    hard = hard_ids(tok)
    ids = [rng.choice(hard) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
           for _ in range(3000)]
    sizes: list[int] = []
    decode = tok.decode

    def counting_decode(window, **kw):
        sizes.append(len(window))
        return decode(window, **kw)

    monkeypatch.setattr(tok, "decode", counting_decode)
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.push(i)
    detok.flush()
    monkeypatch.undo()
    assert detok.text == tok.decode(ids)
    assert len(sizes) <= 2 * len(ids) + 2 and sum(sizes) <= 6 * len(ids), (len(sizes), sum(sizes))
    if not byte_fallback_ids(tok):  # without byte-fallback runs the window itself is bounded
        assert max(sizes) <= 4

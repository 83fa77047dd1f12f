"""StopMatcher against a plain reference: the text cut before the leftmost stop occurrence,
however the text is split into deltas, with nothing of a stop ever emitted."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.stops import StopMatcher

FAST = settings(max_examples=200, deadline=None)
ALPHABET = "ab\n#é"  # few characters, so stops occur, overlap and half-occur often


def reference(text: str, stops: list[str]) -> str:
    """The text before the earliest occurrence of any stop (the whole text if none)."""
    found = [text.find(s) for s in stops if s in text]
    return text[:min(found)] if found else text


def undecided_from(text: str, stops: list[str]) -> int:
    """Where the text that may still be (part of) a stop begins: the first position whose
    suffix is a proper prefix of some stop, or where a complete stop starts."""
    starts = [i for i in range(len(text))
              if any(s.startswith(text[i:]) and len(s) > len(text) - i for s in stops)]
    starts += [text.find(s) for s in stops if s in text]
    return min(starts, default=len(text))


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for delta in deltas:
        emitted, stopped = matcher.push(delta)
        out.append(emitted)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


texts = st.text(ALPHABET, max_size=30)
stop_lists = st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=6)


@FAST
@given(text=texts, stops=stop_lists, data=st.data())
def test_matches_the_reference_however_the_text_is_split(text, stops, data):
    deltas = split(text, data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    expected = reference(text, stops)
    matcher = StopMatcher(stops)
    seen, emitted = "", ""
    for delta in deltas:
        out, stopped = matcher.push(delta)
        seen, emitted = seen + delta, emitted + out
        assert expected.startswith(emitted), (seen, emitted)  # nothing of a stop leaks
        if stopped:
            assert emitted == expected and reference(seen, stops) == expected
            break
        # Everything that cannot be the start of a stop is out already.
        assert emitted == seen[:undecided_from(seen, stops)], (seen, emitted)
    else:
        emitted += matcher.flush()
    assert emitted == expected
    assert matcher.stopped == any(s in text for s in stops)


@FAST
@given(text=st.text(ALPHABET, min_size=1, max_size=30), stops=stop_lists)
def test_one_character_at_a_time(text, stops):
    assert run(stops, list(text)) == run(stops, [text])
    assert run(stops, list(text))[0] == reference(text, stops)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_hundreds_of_stops(seed):
    rng = random.Random(seed)
    letters = "abcdefgh"
    stops = ["".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(300)]
    text = "".join(rng.choices(letters + " ", k=400))
    cuts = rng.sample(range(len(text)), 60)
    assert run(stops, split(text, cuts)) == (reference(text, stops), any(s in text for s in stops))


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    delta = "anything </s> at all"
    out, stopped = matcher.push(delta)
    assert out is delta and not stopped
    assert matcher.flush() == ""


def test_stop_split_across_deltas_is_caught_and_never_leaked():
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("The answer is 42</ans") == ("The answer is 42", False)  # "</ans" held
    assert matcher.push("wer> and then more") == ("", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_withheld_prefix_is_released_when_no_stop_follows():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)
    assert matcher.push("ill") == ("STill", False)  # "STi" begins no stop: released
    assert matcher.push(" going ST") == (" going ", False)
    assert matcher.flush() == "ST"  # the end: "ST" is just text
    assert not matcher.stopped


def test_the_earliest_stop_wins():
    # Both occur; the cut is before the leftmost, not the first listed or first completed.
    assert run(["world", "lo w"], ["hello world"]) == ("hel", True)
    # "ion" completes first, but "Observation:" starts earlier: wait for it and cut there.
    assert run(["Observation:", "ion"], list("Thought. Observation: 42")) == ("Thought. ", True)
    # If the longer one fails, the nested one decides.
    assert run(["Observation:", "ion"], list("Observations")) == ("Observat", True)
    # And at the very end, flush settles it.
    assert run(["Observation:", "ion"], ["Observation"]) == ("Observat", True)


def test_unicode_stops():
    assert run(["。\n", "🙂"], ["你好", "。", "\n世界"]) == ("你好", True)
    assert run(["。\n", "🙂"], ["你好。世界", "🙂!"]) == ("你好。世界", True)


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_rejected(stops):
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(stops)


def test_a_bare_string_is_not_a_list_of_stops():
    with pytest.raises(TypeError, match="sequence of strings"):
        StopMatcher("###")

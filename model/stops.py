"""Stop strings over streamed text: emit what is safe, withhold what may begin a stop.

Semantics: the output is the generated text cut just before the *earliest* (leftmost) occurrence
of any stop string — `text[:min(text.find(s) for s in stops if s in text)]` — whatever the
deltas it arrived in. A stop is reported as soon as that cut is decided: a complete stop at
position p, with no longer stop still able to complete from a position before p. That is at once
in the usual case; a stop nested inside a longer one ("ion" inside "Observation:") waits until
the longer one completes (cut earlier) or fails.

Text that is a proper prefix of some stop ("</ans" for "</answer>") is withheld until decided;
everything before it goes out at once.

Matching walks a trie of the stops from every start position still alive, so a push costs
O(len(delta) · longest stop) whatever the number of stops; characters that begin no stop are
skipped with one regex search.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_END = ""  # trie key marking "a stop string ends here"; never a character key

Trie = dict[str, "Trie | bool"]


class StopMatcher:
    """Cuts one stream of text deltas at the earliest occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            raise TypeError(f"stops must be a sequence of strings, not the string {stops!r}")
        if bad := [s for s in stops if not isinstance(s, str) or not s]:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self._root: Trie = {}
        for stop in self.stops:
            node = self._root
            for ch in stop:
                node = node.setdefault(ch, {})
            node[_END] = True
        # Characters that can start a stop: a text without any is emitted straight away.
        self._first = re.compile("[" + "".join(map(re.escape, sorted(self._root))) + "]"
                                 if self._root else "(?!)")  # (?!) never matches
        self._buf = ""  # text received but not yet emitted
        self._buf_start = 0  # position of _buf[0] in the whole text
        self._active: list[tuple[int, Trie]] = []  # (start, node): text[start:] is a stop prefix
        self._match: int | None = None  # start of the earliest complete stop seen so far
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found (by `push`, or by `flush` for an undecided one)."""
        return self._stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Add the next delta; return (text safe to emit now, whether generation must stop)."""
        if not self.stops:
            return delta, False
        if self._stopped:
            return "", True
        pos = self._buf_start + len(self._buf)  # position of delta[0] in the whole text
        self._buf += delta
        i = 0
        while i < len(delta):
            if not self._active and self._match is None:
                # Nothing open: jump to the next character that can start a stop.
                m = self._first.search(delta, i)
                if m is None:
                    break
                i = m.start()
            self._step(delta[i], pos + i)
            i += 1
            if self._match is not None and not self._active:
                # No stop starting earlier can still complete (`_step` keeps only those): decided.
                self._stopped = True
                return self._release(self._match), True
        starts = [s for s, _ in self._active]
        if self._match is not None:
            starts.append(self._match)
        return self._release(min(starts, default=self._buf_start + len(self._buf))), False

    def flush(self) -> str:
        """At the end of generation: release what was withheld (up to a stop found undecided)."""
        if self._stopped:
            return ""
        end = self._buf_start + len(self._buf)
        if self._match is not None:  # the longer candidates can no longer complete
            self._stopped = True
            end = self._match
        self._active = []
        out = self._release(end)
        self._buf = ""
        return out

    def _step(self, ch: str, pos: int) -> None:
        """Advance every live partial match by `ch` (at `pos`) and start a new one there."""
        active = []
        candidates = self._active
        if self._match is None:  # a stop starting after a found one cannot win
            candidates = [*candidates, (pos, self._root)]
        for start, node in candidates:
            child = node.get(ch)
            if child is None:
                continue
            if _END in child and (self._match is None or start < self._match):
                self._match = start
            if len(child) > (_END in child):  # some longer stop continues from here
                active.append((start, child))
        if self._match is not None:
            active = [(s, n) for s, n in active if s < self._match]
        self._active = active

    def _release(self, end: int) -> str:
        """Emit the buffered text before position `end`."""
        n = end - self._buf_start
        out, self._buf = self._buf[:n], self._buf[n:]
        self._buf_start = end
        return out

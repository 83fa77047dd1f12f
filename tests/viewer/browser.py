"""What the viewer's browser tests share: Debian's Chromium, and reading the weights a page renders.

Never `playwright install` (it downloads a browser): the tests use /usr/bin/chromium (or
ATTNSERVE_CHROMIUM) and are skipped where there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("ATTNSERVE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SKIP_REASON = (f"no Chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium) to run the viewer's "
               "browser tests")
PLAYWRIGHT_MISSING = "Python Playwright is not installed (pip install -e '.[dev]')"
TIMEOUT_MS = 20_000


def visible(text: str) -> str:
    """A token's text as the page labels it: whitespace as glyphs, ∅ for no text."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def cells(page, selector: str) -> list[dict]:
    """data-weight/layer/head/query/key of every rendered weight cell under `selector`."""
    return page.locator(f"{selector} [data-weight]").evaluate_all(
        "els => els.map(e => ({...e.dataset}))")


def check_cells(found: list[dict], expected: dict[tuple[int, int], float], layer: int, head) -> None:
    """Each rendered cell shows exactly the API's weight for its (query, key); none is missing."""
    assert {(int(c["query"]), int(c["key"])) for c in found} == set(expected)
    for c in found:
        assert (c["layer"], c["head"]) == (str(layer), str(head))
        want = expected[int(c["query"]), int(c["key"])]
        if head == "mean":  # averaged in the page: same order of additions, so equal up to rounding
            assert float(c["weight"]) == pytest.approx(want, rel=1e-12, abs=1e-15), c
        else:
            assert float(c["weight"]) == want, c


def row(heads: list[list[float]], head) -> list[float]:
    """One head's row of [head][key] weights, or their mean."""
    if head == "mean":
        return [sum(h[k] for h in heads) / len(heads) for k in range(len(heads[0]))]
    return heads[head]

"""The attention viewer (server/static/) in a real headless Chromium against the real server.

The page is driven as a user would (type, generate, click a token, pick a layer and head), and what
it renders — each cell's data-weight — is compared with an independent `/v1/generate` call.
Needs Debian's chromium (`apt-get install -y chromium`) and Python Playwright; never
`playwright install` (it downloads a browser). Set ATTNSERVE_VIEWER_SCREENSHOT=docs/viewer.png to
also write the README's screenshot.
"""

from __future__ import annotations

import os
import shutil

import pytest
import requests

from tests.serving import running_server
from tests.viewer.browser import (
    CHROMIUM,
    PLAYWRIGHT_MISSING,
    SKIP_REASON,
    TIMEOUT_MS,
    cells,
    check_cells,
    row,
    visible,
)

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():  # skipped at collection, so that no server starts for nothing
    pytest.skip(SKIP_REASON, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect

PROMPT = "two plus three equals"
ATTENTION = {"layers": "all", "heads": "all", "include_prompt": True}
KEY = "viewer-key"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with an API key and an 8-token context (for the 401 and overflow cases)."""
    with running_server(tmp_path_factory.mktemp("viewer-guarded"), "--api-key", KEY, "--max-context", "8",
                        "--max-batch", "2") as srv:
        yield srv


def shown(token: dict) -> str:
    """A generated token's chip: the text it added, else its own text from top_logprobs ("<|eos|>")."""
    own = [t["text"] for t in token.get("top_logprobs", []) if t["id"] == token["id"]]
    return visible(token["text"] or (own[0] if own else ""))


def generate(page, prompt: str = PROMPT, *, max_tokens: int = 8, key: str | None = None) -> None:
    page.fill("#prompt", prompt)
    page.select_option("#strategy", "greedy")
    page.fill("#max-tokens", str(max_tokens))
    if key is not None:
        page.fill("#api-key", key)
    page.click("#generate")


def test_generate_select_token_and_layer_head(server, page, tmp_path):
    reference = requests.post(server.url + "/v1/generate", timeout=30, json={
        "prompt": PROMPT, "max_tokens": 8, "logprobs": 5, "attention": ATTENTION}).json()
    prompt, tokens = reference["prompt_tokens"], reference["tokens"]
    n, layers, heads = len(prompt), len(reference["prompt_attention"]), len(reference["prompt_attention"][0])
    assert reference["text"] == " five"

    page.goto(server.url + "/")
    generate(page)
    expect(page.locator("#status")).to_contain_text("Finished (stop)", timeout=TIMEOUT_MS)

    # The tokens as they came, spaces visible.
    chips = page.locator("#tokens .tok")
    assert chips.locator(".tok-text").all_inner_texts() == [visible(t["text"]) for t in prompt] + [
        shown(t) for t in tokens]
    assert page.locator("#tokens .tok.generated .tok-text").first.inner_text() == "␣five"

    # Select " five" and a layer / head: the heatmap is that token's row, as the API returns it.
    page.locator(f'#tokens .tok[data-pos="{n}"]').click()
    expect(page.locator(f'#tokens .tok[data-pos="{n}"]')).to_have_attribute("aria-pressed", "true")
    for layer, head in [(layers - 1, heads - 1), (1, 2), (1, "mean")]:
        page.select_option("#layer", str(layer))
        page.select_option("#head", str(head))
        weights = row(tokens[0]["attention"][layer], head)
        check_cells(cells(page, "#heatmap"), {(n - 1, k): w for k, w in enumerate(weights)}, layer, head)

    # The whole [query × key] matrix: prompt rows, then the rows that chose each later token;
    # the causal upper triangle is blank (no weight).
    layer, head = 2, 0
    page.select_option("#layer", str(layer))
    page.select_option("#head", str(head))
    matrix = [row(h, head) for h in zip(*reference["prompt_attention"][layer], strict=True)]
    matrix += [row(t["attention"][layer], head) for t in tokens[1:]]
    rows = len(matrix)
    assert rows == n + len(tokens) - 1
    check_cells(cells(page, "#matrix"), {(q, k): w for q, r in enumerate(matrix) for k, w in enumerate(r)},
                layer, head)
    assert page.locator("#matrix td.masked").count() == rows * (rows - 1) // 2

    # A prompt token shows its own query row; hovering previews another; arrow keys move.
    page.locator('#tokens .tok[data-pos="2"]').click()
    check_cells(cells(page, "#heatmap"), {(2, k): w for k, w in enumerate(matrix[2])}, layer, head)
    page.locator('#tokens .tok[data-pos="3"]').hover()
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", "3")
    page.mouse.move(5, 5)
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", "2")
    page.keyboard.press("ArrowRight")
    expect(page.locator('#tokens .tok[data-pos="3"]')).to_have_attribute("aria-pressed", "true")
    expect(page.locator('#tokens .tok[data-pos="3"]')).to_be_focused()

    # The picture for the README: " five" selected, layer 1, mean of heads.
    page.locator(f'#tokens .tok[data-pos="{n}"]').click()
    page.select_option("#layer", "1")
    page.select_option("#head", "mean")
    page.mouse.move(5, 5)
    shot = tmp_path / "viewer.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("ATTNSERVE_VIEWER_SCREENSHOT"):
        shutil.copyfile(shot, target)

    # Offline: nothing but the server itself was asked for (no CDN, no fonts from elsewhere).
    assert all(url.startswith(server.url + "/") for url in page.requested), page.requested


def test_api_key_field_and_401(guarded, page, tmp_path):
    refused = requests.post(guarded.url + "/v1/generate", timeout=30, headers={"Authorization": "Bearer nope"},
                            json={"prompt": PROMPT, "stream": True})
    assert refused.status_code == 401
    error = refused.json()["error"]

    page.goto(guarded.url + "/")
    expect(page.locator("#api-key")).to_have_attribute("type", "password")
    for key in ("", "not-the-key"):
        generate(page, key=key)
        shown_error = page.locator("#error")
        expect(shown_error).to_be_visible(timeout=TIMEOUT_MS)
        expect(shown_error).to_contain_text(f"HTTP 401): {error['type']}")
        expect(shown_error.locator(".error-message")).to_have_text(error["message"])
        assert page.locator("#tokens .tok").count() == 0

    generate(page, key=KEY)
    expect(page.locator("#status")).to_contain_text("Finished", timeout=TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#tokens .tok.generated .tok-text").first.inner_text() == "␣five"
    # Kept in the page only: not in any storage, not in the URL.
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert KEY not in page.url and not page.context.cookies()


def test_context_overflow_is_shown(guarded, page, tmp_path):
    prompt = "one plus two plus three plus four equals"
    refused = requests.post(guarded.url + "/v1/generate", timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                            json={"prompt": prompt, "stream": True, "attention": ATTENTION})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "context_length_exceeded" and "context" in error["message"]

    page.goto(guarded.url + "/")
    generate(page, prompt, key=KEY)
    shown = page.locator("#error")
    expect(shown).to_be_visible(timeout=TIMEOUT_MS)
    expect(shown).to_contain_text("HTTP 400")
    expect(shown).to_contain_text("context_length_exceeded")
    expect(shown.locator(".error-message")).to_have_text(error["message"])
    fields = dict(zip(shown.locator("dt").all_inner_texts(), shown.locator("dd").all_inner_texts(), strict=True))
    assert fields == {"prompt_tokens": str(error["prompt_tokens"]), "max_context": "8"}
    expect(page.locator("#status")).to_have_text("Failed.")
    page.screenshot(path=tmp_path / "viewer-error.png", full_page=True)

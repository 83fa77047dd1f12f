"""The viewer's Analyze mode, its logit lens table and its model picker, in a real headless Chromium
against a real server serving every shipped checkpoint.

What the page renders — each lens cell's data-top, each token's data-logprob, each attention cell's
data-weight — is compared with independent `/v1/analyze` and `/v1/generate` calls. With
ATTNSERVE_VIEWER_SCREENSHOT=docs/viewer.png set (as for test_viewer.py), the README's other two
pictures are written beside it: viewer-analyze.png and viewer-pronouns.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import requests

from tests.serving import ROOT, running_server
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

PROMPT, COMPLETION = "two plus three equals", " five"
TROPHY = "the trophy did not fit in the suitcase because it was too big . it refers to the"
ALL = {"layers": "all", "heads": "all"}
LENS = {"layers": "all", "top_k": 5}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The server's default: every checkpoint under checkpoints/ (the calculator first)."""
    with running_server(tmp_path_factory.mktemp("viewer-shipped"), "--max-batch", "4", shipped=True) as srv:
        srv.models = {m["id"]: m for m in requests.get(srv.url + "/v1/models", timeout=10).json()["data"]}
        yield srv


@pytest.fixture
def pronouns(shipped):
    if "pronouns" not in shipped.models:
        pytest.skip(f"no checkpoints/pronouns in {ROOT / 'checkpoints'}: the pronoun model is not served")
    return shipped.models["pronouns"]


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    """Full-page screenshot; also into the README's folder when ATTNSERVE_VIEWER_SCREENSHOT is set."""
    page.mouse.move(5, 5)
    shot = tmp_path / name
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("ATTNSERVE_VIEWER_SCREENSHOT"):
        shutil.copyfile(shot, Path(target).parent / name)


def open_viewer(page, server) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#model-picker option")).to_have_count(len(server.models), timeout=TIMEOUT_MS)


def lens_cells(page) -> dict[tuple[int, int], dict]:
    """(layer, position) → {top: the top-k as the page got it, word, prob, title, hit} of every cell."""
    found = page.locator("#lens-table td[data-top]").evaluate_all("""els => els.map(e => ({
        layer: +e.dataset.layer, pos: +e.dataset.pos, top: e.dataset.top, title: e.title,
        word: e.querySelector('.lens-tok').innerText, prob: e.querySelector('.lens-prob').innerText,
        hit: e.classList.contains('hit')}))""")
    return {(c["layer"], c["pos"]): {**c, "top": json.loads(c["top"])} for c in found}


def shown_percent(p: float) -> str:
    return "100%" if p >= 0.9995 else f"{100 * p:.0f}%" if p >= 0.1 else f"{100 * p:.1f}%"


def test_analyze_mode_lens_surprisal_and_score(shipped, page, tmp_path):
    reference = requests.post(shipped.url + "/v1/analyze", timeout=30, json={
        "model": "calculator", "prompt": PROMPT, "completion": COMPLETION, "attention": ALL, "logprobs": 5,
        "logit_lens": LENS}).json()
    tokens, lens = reference["tokens"], reference["logit_lens"]
    n, layers = len(tokens), lens["layers"]
    assert layers == list(range(len(reference["attention"])))

    open_viewer(page, shipped)
    page.check("#mode-analyze")
    expect(page.locator("#generate")).to_have_text("Analyze")
    expect(page.locator("#max-tokens")).to_be_hidden()
    page.fill("#prompt", PROMPT)
    page.fill("#completion", COMPLETION)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Analyzed", timeout=TIMEOUT_MS)

    # Each token, coloured by its surprisal: the page holds exactly the API's logprob; position 0 none.
    chips = page.locator("#tokens .tok")
    assert chips.locator(".tok-text").all_inner_texts() == [visible(t["text"]) for t in tokens]
    shown = chips.evaluate_all("els => els.map(e => e.dataset.logprob ?? null)")
    assert shown[0] is None and tokens[0]["logprob"] is None
    assert [float(x) for x in shown[1:]] == [t["logprob"] for t in tokens[1:]]
    assert chips.evaluate_all("els => els.map(e => e.classList.contains('completion'))") == [False] * (n - 1) + [True]
    score = page.locator("#score")
    expect(score).to_be_visible()
    assert float(score.get_attribute("data-logprob")) == reference["completion_logprob"]
    expect(score).to_contain_text(f"{reference['completion_logprob']:.4f}")

    # The lens table: a cell per (layer, position), each the API's top-k exactly; the text shows
    # the top token and its probability, the title all k; bold where it names the next token.
    found = lens_cells(page)
    assert set(found) == {(layer, q) for layer in layers for q in range(n)}
    for (layer, q), cell in found.items():
        want = lens["top"][layers.index(layer)][q]
        assert cell["top"] == want, (layer, q)
        assert cell["hit"] == (q + 1 < n and tokens[q + 1]["id"] == want[0]["id"])
    for layer, q in [(layers[-1], n - 2), (1, 2), (0, 0)]:
        cell, want = found[layer, q], lens["top"][layers.index(layer)][q]
        assert cell["word"] == visible(want[0]["text"]) and cell["prob"] == shown_percent(want[0]["prob"])
        for t in want:
            assert json.dumps(t["text"]) in cell["title"] and f"{100 * t['prob']:.2f}%" in cell["title"]
    # The last layer's lens is the model's own distribution: " five" after " equals".
    assert found[layers[-1], n - 2]["top"][0]["text"] == COMPLETION and found[layers[-1], n - 2]["hit"]

    # The heatmap opens on the prompt's last token (the answer-predicting one), as the API has it;
    # every position is a query row, the last included.
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", str(n - 2))
    for layer, head in [(0, 0), (len(layers) - 1, "mean")]:
        page.select_option("#layer", str(layer))
        page.select_option("#head", str(head))
        heads = [reference["attention"][layer][h][n - 2] for h in range(len(reference["attention"][0]))]
        check_cells(cells(page, "#heatmap"), {(n - 2, k): w for k, w in enumerate(row(heads, head))}, layer, head)
    assert page.locator("#matrix tbody tr").count() == n

    # Clicking a lens column selects that position.
    page.locator('#lens-table th.col-label[data-pos="2"]').click()
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", "2")
    expect(page.locator('#lens-table td.selected[data-pos="2"]')).to_have_count(len(layers))

    page.locator(f'#tokens .tok[data-pos="{n - 2}"]').click()
    page.select_option("#layer", "1")
    save_screenshot(page, tmp_path, "viewer-analyze.png")


def test_generate_mode_lens(shipped, page):
    """The lens checkbox in Generate mode: the prompt's rows, then each step that chose a token."""
    # Asked as the page asks (attention too: the explicit attention path, as the page's request takes).
    reference = requests.post(shipped.url + "/v1/generate", timeout=30, json={
        "prompt": PROMPT, "max_tokens": 8, "logprobs": 5, "attention": {**ALL, "include_prompt": True},
        "logit_lens": {**LENS, "include_prompt": True}}).json()
    prompt, generated = reference["prompt_tokens"], reference["tokens"]
    n, layers = len(prompt), range(len(reference["prompt_logit_lens"]))
    expected = {(layer, q): reference["prompt_logit_lens"][layer][q] for layer in layers for q in range(n - 1)}
    expected |= {(layer, n - 1 + i): t["logit_lens"][layer] for layer in layers for i, t in enumerate(generated)}

    open_viewer(page, shipped)
    expect(page.locator("#lens-card")).to_be_hidden()
    page.check("#lens")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "8")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Finished (stop)", timeout=TIMEOUT_MS)
    assert {k: v["top"] for k, v in lens_cells(page).items()} == expected
    # Off again: no lens asked for, no table.
    page.uncheck("#lens")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Finished (stop)", timeout=TIMEOUT_MS)
    expect(page.locator("#lens-card")).to_be_hidden()


def test_model_picker_examples_and_focus_head(shipped, pronouns, page, tmp_path):
    focus = pronouns["attention_focus"]
    assert focus["position"] == "last"
    ref = requests.post(shipped.url + "/v1/generate", timeout=30, json={
        "model": "pronouns", "prompt": TROPHY, "max_tokens": 4, "logprobs": 5,
        "attention": {**ALL, "include_prompt": True}}).json()
    n = len(ref["prompt_tokens"])
    assert ref["text"] == " trophy"

    open_viewer(page, shipped)
    page.evaluate("window.notReloaded = true")
    options = page.locator("#model-picker option").evaluate_all("els => els.map(e => e.value)")
    assert options == list(shipped.models)
    expect(page.locator("#examples .example")).to_have_count(len(shipped.models["calculator"].get("examples", [])))

    # Pick the pronoun model: its card's examples as buttons; one click fills the prompt.
    page.select_option("#model-picker", "pronouns")
    examples = page.locator("#examples .example")
    expect(examples).to_have_count(len(pronouns["examples"]))
    assert pronouns["examples"][0]["prompt"] == TROPHY
    examples.nth(1).click()
    assert page.input_value("#prompt") == pronouns["examples"][1]["prompt"]
    examples.nth(0).click()
    assert page.input_value("#prompt") == TROPHY
    page.fill("#max-tokens", "4")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Finished", timeout=TIMEOUT_MS)
    assert page.locator("#tokens .tok.generated .tok-text").first.inner_text() == "␣trophy"
    expect(page.locator("#model")).to_contain_text("pronouns")

    # It opens on the head the model card's probe found, at the answer position (the prompt's last).
    assert (page.input_value("#layer"), page.input_value("#head")) == (str(focus["layer"]), str(focus["head"]))
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", str(n - 1))
    weights = ref["prompt_attention"][focus["layer"]][focus["head"]][n - 1]
    check_cells(cells(page, "#heatmap"), {(n - 1, k): w for k, w in enumerate(weights)}, focus["layer"], focus["head"])
    trophy = [t["text"] for t in ref["prompt_tokens"]].index(" trophy")
    assert max(range(n), key=weights.__getitem__) == trophy  # the head looks at the referent
    save_screenshot(page, tmp_path, "viewer-pronouns.png")
    # Another head of this model, as the API has it.
    page.select_option("#head", "mean")
    check_cells(cells(page, "#heatmap"), {(n - 1, k): w for k, w in enumerate(
        row([h[n - 1] for h in ref["prompt_attention"][focus["layer"]]], "mean"))}, focus["layer"], "mean")

    # In Analyze mode an example fills prompt and completion, and scoring opens on the focus too.
    scored = requests.post(shipped.url + "/v1/analyze", timeout=30, json={
        "model": "pronouns", **pronouns["examples"][0], "attention": ALL}).json()
    weights = scored["attention"][focus["layer"]][focus["head"]][n - 1]
    page.check("#mode-analyze")
    page.select_option("#model-picker", "calculator")
    page.select_option("#model-picker", "pronouns")  # a fresh pick: the focus applies again
    examples.nth(0).click()
    assert page.input_value("#completion") == pronouns["examples"][0]["completion"]
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Analyzed", timeout=TIMEOUT_MS)
    expect(page.locator("#heatmap")).to_have_attribute("data-pos", str(n - 1))
    assert page.input_value("#head") == str(focus["head"])
    check_cells(cells(page, "#heatmap"), {(n - 1, k): w for k, w in enumerate(weights)}, focus["layer"], focus["head"])

    # Back to the calculator, no reload: its prompt comes back and its heatmap is its own model's.
    page.check("#mode-generate")
    page.select_option("#model-picker", "calculator")
    assert page.input_value("#prompt") == PROMPT
    calc = requests.post(shipped.url + "/v1/generate", timeout=30, json={
        "model": "calculator", "prompt": PROMPT, "max_tokens": 8, "attention": {**ALL, "include_prompt": True}}).json()
    page.fill("#max-tokens", "8")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Finished (stop)", timeout=TIMEOUT_MS)
    expect(page.locator("#model")).to_contain_text("calculator")
    m = len(calc["prompt_tokens"])
    page.locator(f'#tokens .tok[data-pos="{m}"]').click()
    page.select_option("#layer", "2")
    page.select_option("#head", "1")
    check_cells(cells(page, "#heatmap"), {(m - 1, k): w for k, w in enumerate(calc["tokens"][0]["attention"][2][1])},
                2, 1)
    assert page.evaluate("window.notReloaded") is True

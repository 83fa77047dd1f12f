"""The browser and a fresh page per test, for the viewer's tests (tests/viewer/browser.py)."""

from __future__ import annotations

import pytest

from tests.viewer.browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # the test modules skip first when it is missing

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page that records every request it makes and every script error it hits."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requested, page.script_errors = [], []
    page.on("request", lambda r: page.requested.append(r.url))
    page.on("pageerror", lambda e: page.script_errors.append(str(e)))
    yield page
    context.close()
    assert not page.script_errors, f"the page raised: {page.script_errors}"

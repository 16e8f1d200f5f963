"""Driving the app's page from a real browser, shared by the browser tests (`test_serve_app.py`) and the script that
takes the docs screenshot (`scripts/app_screenshot.py`): Debian's headless Chromium through Playwright (never a
downloaded browser), a free localhost port, and the page's own element ids."""

from __future__ import annotations

import socket

#: Debian's Chromium (`apt-get install chromium`, as root); Playwright drives it, it never downloads one.
CHROMIUM = "/usr/bin/chromium"
#: Headless in a container, with no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def free_port() -> int:
    """A localhost port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_pane(page, index: int, kind: str, **fields) -> None:
    """Pick pane `index`'s variant in its dropdown and fill its fields (`sigma`, `k`)."""
    page.get_by_label(f"pane {index}", exact=True).click()
    page.locator(f"#pane-{index}-kind").get_by_role("option", name=kind, exact=True).click()
    for name, value in fields.items():
        box = page.locator(f"#pane-{index}-{name} input")
        box.wait_for(state="visible", timeout=30_000)
        box.fill(str(value))


def generate_and_wait(page, prompt: str, max_new_tokens: int) -> None:
    """Generate greedily (the page's default) from `prompt` and wait until the score matrix is shown."""
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#max-new-tokens input").fill(str(max_new_tokens))
    assert page.locator("#greedy input").is_checked()  # greedy is the page's default
    page.locator("#generate").click()
    page.locator("#hfema-scores-table table").wait_for(timeout=180_000)


def assert_one_error(page, message: str) -> None:
    """`message` appears once on the page (the status line), with no Gradio toast and no "Error" badge on any
    output box."""
    shown = page.get_by_text(message)
    shown.first.wait_for(timeout=30_000)
    assert shown.count() == 1, shown.all_inner_texts()
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert page.get_by_text("Error", exact=True).count() == 0

"""The page as a user meets it on their own small model: bounds from the model's context, one error message in one
place, compact token views, each pane's progress, and a title that renders in one font.

The browser test drives Debian's /usr/bin/chromium (Playwright) against the real server; screenshots go to
`artifacts/` (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _app_page import CHROMIUM, CHROMIUM_ARGS, assert_one_error, free_port

from serve.launch import start_app
from serve.loading import CheckpointCatalog
from serve.variants import VariantStore

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tokenizer, lm_data):
    """A real Trainer + EMACallback run of a model whose context is 64 tokens."""
    from _serve_runs import train_run

    return train_run(
        tmp_path_factory.mktemp("short"), tokenizer, lm_data, steps=4, save_steps=4, max_positions=CONTEXT
    )


def newline_run(run: Path, out: Path, tokenizer) -> Path:
    """A copy of `run`'s final raw model and EMA whose greedy continuation of anything is newline tokens only.

    The attention and MLP outputs are zeroed, so each position's hidden state is its token's embedding; the final
    norm keeps only the first feature, which every embedding has positive, and the newline token's is the largest.
    With the embeddings tied to the output layer, the newline token then has the highest logit everywhere.
    """
    from transformers import AutoModelForCausalLM

    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for folder in (out, out / "ema"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.tie_word_embeddings
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            embeddings = model.model.embed_tokens.weight
            embeddings[:, 0] = 1.0
            embeddings[newline, 0] = 2.0
        model.save_pretrained(folder)
    return out


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def generate_and_wait(page) -> None:
    page.locator("#generate").click()
    page.locator("#hfema-scores-table table").wait_for(timeout=180_000)
    page.wait_for_function("!document.querySelector('#status').innerText.trim()", timeout=60_000)


def title_fonts(page) -> list[str]:
    """The fonts Chromium used to draw the page title's text."""
    page.locator("#title h1").wait_for()
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "#title h1"})["nodeId"]
    return [font["familyName"] for font in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]]


@pytest.mark.browser
def test_page_on_a_model_with_a_64_token_context(short_run, browser, tmp_path, tokenizer):
    """On a model with a 64-token context: the default request succeeds; a bad value is exactly one message, with
    no "Error" badge on any output box; an answer that fills the context with newlines fits in 1.5 screen heights;
    the bold title is drawn in one font."""
    from transformers import AutoModelForCausalLM

    run = newline_run(short_run, tmp_path / "newlines", tokenizer)
    prompt = "The"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    demo, url = start_app(run, port=free_port(), device="cpu")
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        assert len(title_fonts(page)) == 1, title_fonts(page)
        # The bounds come from the model's context: at most 63 new tokens, 32 by default.
        assert "(1–63)" in page.locator("#max-new-tokens").inner_text()
        assert page.locator("#max-new-tokens input").input_value() == "32"
        page.locator("#prompt textarea").fill(prompt)
        generate_and_wait(page)
        model = AutoModelForCausalLM.from_pretrained(run)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=32, do_sample=False)[0, n_prompt:])
        assert expected == "\n" * 32
        assert page.locator("#pane-1-output textarea").input_value() == expected
        assert page.locator("#pane-2-output textarea").input_value() == expected

        page.locator("#max-new-tokens input").fill("100")
        page.locator("#generate").click()
        assert_one_error(page, "`max_new_tokens` must be between 1 and 63, got 100")

        longest = CONTEXT - n_prompt
        page.locator("#max-new-tokens input").fill(str(longest))
        generate_and_wait(page)
        assert page.locator("#pane-1-output textarea").input_value() == "\n" * longest
        assert page.locator("#hfema-tokens-1 .tok").count() == longest
        height = page.evaluate("document.documentElement.scrollHeight")
        page.screenshot(path=str(artifact("app_newlines.png")), full_page=True)
        assert height <= 1.5 * VIEWPORT["height"], height
        page.close()
    finally:
        demo.close()


def artifact(name: str) -> Path:
    (REPO / "artifacts").mkdir(exist_ok=True)
    print(f"screenshot: {REPO / 'artifacts' / name}")
    return REPO / "artifacts" / name


def test_each_pane_shows_its_progress_while_it_decodes(full_run):
    """The page handler's updates, as the browser receives them: each pane's header says it is being built, then how
    many tokens it has decoded of how many, then its title alone with its token view and command."""
    import gradio as gr

    from serve.handlers import AppContext, AppHandlers
    from serve.page import build_page

    catalog = CheckpointCatalog(full_run, device="cpu")
    context = AppContext.create(catalog, VariantStore(catalog))
    with gr.Blocks():
        page = build_page(context, "test")
    handlers = AppHandlers(context, page)
    values = {
        page.checkpoint: "final", page.prompt: "The for statement", page.reference: "", page.max_new_tokens: 6,
        page.temperature: 0.8, page.top_p: 0.95, page.seed: 0, page.greedy: True,
    }  # fmt: skip
    for pane, kind in zip(page.panes, ["raw", "ema", "off", "off"]):
        values.update({pane.kind: kind, pane.sigma_rel: 0.15, pane.k: 3, pane.method: "mean", pane.other: "final"})
    updates = list(handlers.compare_on_page(values))
    for index, pane in enumerate(page.panes[:2]):
        headers = [update[pane.header] for update in updates]
        assert "building its weights…" in headers[index]  # the first update is before pane 1 is built
        counts = [int(m.group(1)) for h in headers if (m := re.search(r"(\d+) / 6 tokens", h))]
        assert counts == sorted(counts) and counts[-1] == 6 and len(set(counts)) >= 5, headers
        assert "tokens" not in headers[-1] and "▰" not in headers[-1]
        assert 'class="tok"' in updates[-1][pane.tokens] and updates[-1][pane.command]["visible"]
        assert updates[-1][pane.text]["value"] == updates[-2][pane.text]["value"] != ""
    assert updates[-1][page.status] == "" and "hfema-scores" in updates[-1][page.scores]


@pytest.mark.trainer
def test_a_bema_run_opens_with_its_plain_ema_beside_bema(tmp_path, tokenizer, lm_data, full_run):
    """The page's default panes: raw, EMA (BEMA's weights on a BEMA run), then the plain EMA under the correction
    on a BEMA run, a post-hoc EMA or nothing elsewhere."""
    from _serve_runs import train_run

    from serve.page import _default_panes

    bema_run = train_run(tmp_path / "run", tokenizer, lm_data, bema=True)
    kinds = [p["kind"] for p in _default_panes(CheckpointCatalog(bema_run, device="cpu"))]
    assert kinds[:3] == ["raw", "ema", "ema_plain"]
    assert "ema_plain" not in [p["kind"] for p in _default_panes(CheckpointCatalog(full_run, device="cpu"))]


def test_loss_plot_rows_are_the_logged_losses(full_run, tmp_path):
    """The header's plot draws exactly the eval losses the Trainer logged (read here from `trainer_state.json`), per
    checkpoint up to its own step, and nothing for a folder without a history."""
    import json

    from serve.page import loss_plot

    catalog = CheckpointCatalog(full_run, device="cpu")
    for label, state_dir in [("final", full_run / "checkpoint-8"), ("checkpoint-4", full_run / "checkpoint-4")]:
        history = json.loads((state_dir / "trainer_state.json").read_text())["log_history"]
        expected = {
            (entry["step"], entry[key], f"{key} ({kind})")
            for entry in history
            for key, kind in [("eval_loss", "raw"), ("eval_ema_loss", "EMA")]
            if key in entry
        }
        rows = loss_plot(catalog.ref(label))
        assert list(rows.columns) == ["step", "loss", "curve"]
        assert set(rows.itertuples(index=False, name=None)) == expected and len(rows) == len(expected)
    bare = shutil.copytree(full_run / "checkpoint-8", tmp_path / "checkpoint-8")
    (bare / "trainer_state.json").unlink()
    assert loss_plot(CheckpointCatalog(bare, device="cpu").ref()) is None

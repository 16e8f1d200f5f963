"""The real app on a free localhost port: headless Chromium (Playwright), the Gradio client API, `hf-ema demo`.

Browser tests drive Debian's /usr/bin/chromium (never a downloaded browser) and are skipped when it is absent.
Screenshots go to `artifacts/` at the repository root (git-ignored); their paths are printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest
from _app_page import CHROMIUM, CHROMIUM_ARGS, assert_one_error, choose_pane, free_port, generate_and_wait
from _missing_packages import NOT_IN_THE_DEMO, hf_ema_without
from test_serve_compare import broken_run, independent_models, own_scores

from serve.compare import generate_pair
from serve.generation import GenerationSettings
from serve.launch import start_app
from serve.loading import CheckpointCatalog
from serve.variants import VariantStore

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
PROMPT = "The for statement"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def full_app(full_run):
    demo, url = start_app(full_run, port=free_port(), device="cpu")
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        yield browser
        browser.close()


def direct_greedy(run: Path, lora: bool, max_new_tokens: int) -> tuple[str, str]:
    """What the final raw and EMA models generate, loaded and run the plain transformers / peft way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    outputs = []
    for folder in (run, run / "ema"):
        if lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs[0], outputs[1]


def generate_in_page(page, url: str, max_new_tokens: int) -> tuple[str, str]:
    page.goto(url)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#max-new-tokens input").fill(str(max_new_tokens))
    page.locator("#greedy input").check()
    page.locator("#generate").click()
    page.wait_for_function(
        "document.querySelector('#pane-1-output textarea')?.value.length > 0"
        " && document.querySelector('#pane-2-output textarea')?.value.length > 0",
        timeout=60_000,
    )
    return page.locator("#pane-1-output textarea").input_value(), page.locator("#pane-2-output textarea").input_value()


def wait_for_outputs(page, expected: tuple[str, str]) -> tuple[str, str]:
    """Wait until streaming stops at the expected texts (or time out), then return what the panes show."""
    import json

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # On a timeout the caller's assertion shows the difference.
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(
            f"document.querySelector('#pane-1-output textarea')?.value === {json.dumps(expected[0])}"
            f" && document.querySelector('#pane-2-output textarea')?.value === {json.dumps(expected[1])}",
            timeout=60_000,
        )
    return page.locator("#pane-1-output textarea").input_value(), page.locator("#pane-2-output textarea").input_value()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.browser
@needs_chromium
def test_page_greedy_panes_equal_direct_generation(full_run, full_app, browser):
    expected = direct_greedy(full_run, lora=False, max_new_tokens=24)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    first = generate_in_page(page, full_app, 24)
    assert first[0] and first[1]
    assert wait_for_outputs(page, expected) == expected
    # The page shows the labels, the EMA step and config, the loss plot and the checkpoint picker.
    assert "raw · final" in page.locator("#pane-1-header").inner_text()
    assert "EMA · final" in page.locator("#pane-2-header").inner_text()
    cells = page.locator("#ema-info td").all_inner_texts()
    assert cells == ["decay 0.7", "0.7", "float32", "every step", "8", "8"], cells
    # Gradio's own plot (an SVG drawn in the browser): one line per curve, named in the legend.
    plot = page.locator("#loss-plot svg.marks")
    plot.wait_for(state="visible")
    assert plot.locator(".mark-line path").count() == 2
    legend = plot.locator(".role-legend text").all_text_contents()
    assert {"eval_loss (raw)", "eval_ema_loss (EMA)"} <= set(legend), legend
    assert screenshot(page, "serve_full.png").stat().st_size > 10_000
    page.close()


@pytest.mark.browser
@needs_chromium
def test_page_checkpoint_picker_switches_models(full_run, full_app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(full_app)
    page.get_by_label("checkpoint", exact=True).click()
    page.get_by_role("option", name="checkpoint-4").click()
    page.wait_for_function("document.querySelector('#ema-info').innerText.includes('checkpoint-4')", timeout=30_000)
    assert page.locator("#ema-info td").all_inner_texts()[4] == "4"  # the EMA's step
    store = VariantStore(CheckpointCatalog(full_run / "checkpoint-4", device="cpu"))
    expected = generate_pair(store, PROMPT, GenerationSettings(max_new_tokens=12, greedy=True))
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#max-new-tokens input").fill("12")
    page.locator("#greedy input").check()
    page.locator("#generate").click()
    assert wait_for_outputs(page, expected) == expected
    page.close()


@pytest.mark.browser
@needs_chromium
def test_page_lora_checkpoint(lora_run, browser):
    expected = direct_greedy(lora_run, lora=True, max_new_tokens=16)
    demo, url = start_app(lora_run, port=free_port(), device="cpu")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        first = generate_in_page(page, url, 16)
        assert first[0] and first[1]
        assert wait_for_outputs(page, expected) == expected
        screenshot(page, "serve_lora.png")
        page.close()
    finally:
        demo.close()


@pytest.mark.browser
@needs_chromium
def test_page_shows_errors_and_keeps_serving(full_run, full_app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(full_app)
    page.locator("#generate").click()  # empty prompt
    assert_one_error(page, "`prompt` must not be empty")
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#max-new-tokens input").fill("100000")
    page.locator("#generate").click()
    assert_one_error(page, "`max_new_tokens` must be between 1 and 255, got 100000")
    page.locator("#max-new-tokens input").fill("8")
    page.locator("#seed input").fill("-3")
    page.locator("#generate").click()
    assert_one_error(page, "`seed` must be between 0 and 4294967295, got -3")
    screenshot(page, "serve_error.png")
    # Still serving: a good request from the same page completes.
    page.locator("#seed input").fill("0")
    expected = direct_greedy(full_run, lora=False, max_new_tokens=8)
    page.locator("#greedy input").check()
    page.locator("#generate").click()
    assert wait_for_outputs(page, expected) == expected
    page.close()


def test_eight_concurrent_client_requests_complete(full_run, full_app):
    from gradio_client import Client

    client = Client(full_app, verbose=False)
    settings = [GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed) for seed in range(8)]
    jobs = [
        client.submit(
            prompt=PROMPT,
            max_new_tokens=16,
            temperature=1.0,
            top_p=0.9,
            seed=s.seed,
            greedy=False,
            api_name="/generate",
        )
        for s in settings
    ]
    results = [tuple(job.result(timeout=300)["texts"]) for job in jobs]
    # Each request samples with its own seeded generators, so running them at once changes nothing.
    store = VariantStore(CheckpointCatalog(full_run, device="cpu"))
    assert results == [generate_pair(store, PROMPT, s) for s in settings]
    assert len(set(results)) > 1


def test_bad_client_requests_get_errors_and_server_keeps_serving(full_run, full_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(full_app, verbose=False)
    bad = [
        ({"prompt": "  "}, "`prompt` must not be empty"),
        ({"prompt": PROMPT, "max_new_tokens": 10_000}, "`max_new_tokens` must be between 1 and 255, got 10000"),
        ({"prompt": PROMPT, "seed": 1.5}, "`seed` must be a whole number, got 1.5"),
        ({"prompt": PROMPT, "seed": -1}, "`seed` must be between 0 and 4294967295, got -1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(api_name="/generate", **kwargs)
    # Concurrent bad and good requests: the good ones still complete.
    out: dict[str, object] = {}

    def good():
        out["good"] = client.predict(prompt=PROMPT, max_new_tokens=8, greedy=True, api_name="/generate")

    thread = threading.Thread(target=good)
    thread.start()
    with pytest.raises(AppError):
        client.predict(prompt="", api_name="/generate")
    thread.join(timeout=120)
    assert tuple(out["good"]["texts"]) == direct_greedy(full_run, lora=False, max_new_tokens=8)


def test_demo_command_trains_then_serves_headless(tmp_path):
    """`hf-ema demo` (what `bash scripts/demo.sh` runs) with HF_EMA_DEMO_EXIT_AFTER_START=1, on a tiny budget, with
    peft, datasets and matplotlib unimportable: the demo's install has none of them."""
    out = tmp_path / "tiny"
    env = {
        **os.environ,
        "HF_EMA_DEMO_EXIT_AFTER_START": "1",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    cmd = [*hf_ema_without(NOT_IN_THE_DEMO), "demo", "--output-dir", str(out), "--max-steps", "4"]
    cmd += ["--save-steps", "2", "--port", str(free_port())]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run trained" in first.stdout
    assert "app running at http://127.0.0.1:" in first.stdout
    assert "smoke test: raw and EMA both generated" in first.stdout
    assert (out / "checkpoint-4" / "ema" / "ema_state.json").is_file()
    # A second run finds the trained run and goes straight to the app.
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "skipped training" in second.stdout and "app running at" in second.stdout
    # A finished run moved elsewhere is found there, and served from where it is now.
    moved = tmp_path / "moved"
    out.rename(moved)
    cmd[cmd.index(str(out))] = str(moved)
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "skipped training" in third.stdout and f": {moved}\n" in third.stdout, third.stdout
    assert str(out) not in third.stdout


# ---------------------------------------------------------------------------------------------- the four-pane page
FOUR_PROMPTS = ["The return value of", "The for statement", "The if statement is used", "The while loop", "In Python,"]


def first_difference(token_lists: list[list[int]]) -> int | None:
    """The first position where the token lists differ (a list ending early counts), computed here."""
    for i in range(max(len(t) for t in token_lists)):
        if len({tuple(t[i : i + 1]) for t in token_lists}) > 1:
            return i
    return None


@pytest.mark.browser
@needs_chromium
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_page_four_panes_scores_and_divergence(lora, posthoc_run, posthoc_lora_run, browser, tmp_path):
    """Raw, EMA, post-hoc EMA 0.15 and the mean of the last 3 checkpoints in four panes: each greedy text is what
    `generate` gives with the independently built weights, the score matrix is what `model(input_ids, labels=...)`
    gives, and the divergence marker sits at the first differing token."""
    from transformers import AutoTokenizer

    run = posthoc_lora_run if lora else posthoc_run
    tokenizer = AutoTokenizer.from_pretrained(run)
    models = independent_models(run, lora, tmp_path)
    # The candidate prompt whose four greedy texts agree longest before they differ: a non-trivial marker position.
    best = None
    for prompt in FOUR_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        outs = [
            m.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist() for m in models
        ]
        where = first_difference(outs)
        if best is None or (where if where is not None else -1) > best[0]:
            best = (where if where is not None else -1, prompt, ids[0].tolist(), outs)
    _, prompt, prompt_ids, expected = best
    divergence = first_difference(expected)

    demo, url = start_app(run, port=free_port(), device="cpu")
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(url)
        assert "any sigma_rel can be reconstructed" in page.locator("#posthoc-note").inner_text()
        choose_pane(page, 1, "raw weights")
        choose_pane(page, 2, "EMA")
        choose_pane(page, 3, "post-hoc EMA (any sigma_rel)", sigma="0.15")
        choose_pane(page, 4, "merge of the last k checkpoints", k="3")
        generate_and_wait(page, prompt, 12)
        for i, tokens in enumerate(expected, start=1):
            assert page.locator(f"#pane-{i}-output textarea").input_value() == tokenizer.decode(
                tokens, skip_special_tokens=True
            )
        # The score matrix: every pane's text (column) under every pane's model (row), to 1e-5.
        cells = page.locator("#hfema-scores-table td").all()
        assert len(cells) == 16
        for cell in cells:
            row, col = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
            loss, _ = own_scores(models[row], prompt_ids, expected[col])
            assert float(cell.get_attribute("data-nll")) == pytest.approx(loss, abs=1e-5)
        # Each token shaded by its probability under its own pane's model.
        for i, model in enumerate(models, start=1):
            _, probs = own_scores(model, prompt_ids, expected[i - 1])
            shown = [float(s.get_attribute("data-p")) for s in page.locator(f"#hfema-tokens-{i} .tok").all()]
            assert shown == pytest.approx(probs, abs=1e-5)
        # The divergence marker: at the first differing token in every pane that has a token there.
        assert page.locator("#hfema-divergence").get_attribute("data-divergence") == str(divergence)
        for i, tokens in enumerate(expected, start=1):
            marked = page.locator(f"#hfema-tokens-{i} .tok.diverge")
            if divergence is not None and divergence < len(tokens):
                assert marked.count() == 1 and marked.get_attribute("data-i") == str(divergence)
            else:
                assert marked.count() == 0
        # The command behind each pane's weights.
        assert "hf-ema push" in page.locator("#pane-2-command").inner_text()
        assert "hf-ema posthoc" in page.locator("#pane-3-command").inner_text()
        assert "--sigma-rel 0.15" in page.locator("#pane-3-command").inner_text()
        assert "hf-ema merge" in page.locator("#pane-4-command").inner_text()
        assert "profile fit error" in page.locator("#pane-3-header").inner_text()
        screenshot(page, f"app_four_panes_{'lora' if lora else 'full'}.png")
        page.close()
    finally:
        demo.close()


@pytest.mark.browser
@needs_chromium
def test_page_variant_errors_show_in_their_panes_and_keep_serving(full_run, browser, tmp_path, tokenizer):
    """A run without post-hoc snapshots, a sigma_rel outside the valid range and a merge of checkpoints that do
    not hold the same model: each pane says why; the raw pane still generates, and so does the next request."""
    run = broken_run(full_run, tmp_path, tokenizer)
    demo, url = start_app(run, port=free_port(), device="cpu")
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(url)
        note = page.locator("#posthoc-note").inner_text()
        assert "has no ema_posthoc/ snapshots" in note and "EMACallback(posthoc=True)" in note
        choose_pane(page, 2, "post-hoc EMA (any sigma_rel)", sigma="0.15")
        choose_pane(page, 3, "post-hoc EMA (any sigma_rel)", sigma="0.5")
        choose_pane(page, 4, "merge of the last k checkpoints", k="2")
        generate_and_wait(page, PROMPT, 8)
        assert "holds no post-hoc EMA snapshots" in page.locator("#pane-2-header").inner_text()
        assert "EMACallback(posthoc=True)" in page.locator("#pane-2-header").inner_text()
        assert "sigma_rel must be in (0, 0.2887), got 0.5" in page.locator("#pane-3-header").inner_text()
        assert "checkpoint-4" in page.locator("#pane-4-header").inner_text()
        expected = direct_greedy(run, lora=False, max_new_tokens=8)
        assert page.locator("#pane-1-output textarea").input_value() == expected[0]
        screenshot(page, "app_variant_errors.png")
        # Still serving: the same page, the errors fixed.
        choose_pane(page, 2, "EMA")
        choose_pane(page, 3, "off")
        choose_pane(page, 4, "off")
        page.locator("#generate").click()
        assert wait_for_outputs(page, expected) == expected
        page.close()
    finally:
        demo.close()


def test_server_log_one_line_for_rejected_requests_and_no_deprecation(full_app, capfd, caplog):
    """A rejected request logs one line (no traceback); decoding logs no deprecation warning."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(full_app, verbose=False)
    capfd.readouterr()
    client.predict(prompt=PROMPT, max_new_tokens=4, greedy=True, api_name="/generate")
    with pytest.raises(AppError, match="`checkpoint` must be one of"):
        client.predict(prompt=PROMPT, variants=["raw"], checkpoint="checkpoint-99", api_name="/compare")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert "past_key_values" not in err and "FutureWarning" not in err, err
    rejected = [r for r in caplog.records if "rejected a compare request" in r.getMessage()]
    assert len(rejected) == 1 and "`checkpoint` must be one of" in rejected[0].getMessage()

"""The real app on a free localhost port: headless Chromium (Playwright), the Gradio client API, `hf-ema demo`.

Browser tests drive Debian's /usr/bin/chromium (never a downloaded browser) and are skipped when it is absent.
Screenshots go to `artifacts/` at the repository root (git-ignored); their paths are printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serve.generation import GenerationSettings, generate_pair
from serve.launch import start_app
from serve.loading import find_checkpoints, load_pair

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
PROMPT = "The for statement"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
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
        "document.querySelector('#pane-1-output textarea').value.length > 0"
        " && document.querySelector('#pane-2-output textarea').value.length > 0",
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
            f"document.querySelector('#pane-1-output textarea').value === {json.dumps(expected[0])}"
            f" && document.querySelector('#pane-2-output textarea').value === {json.dumps(expected[1])}",
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
    info = page.locator("#ema-info").inner_text()
    assert "EMA step 8" in info and "decay=0.7" in info
    assert page.locator("#loss-plot img").is_visible()
    assert screenshot(page, "serve_full.png").stat().st_size > 10_000
    page.close()


@pytest.mark.browser
@needs_chromium
def test_page_checkpoint_picker_switches_models(full_run, full_app, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(full_app)
    page.get_by_label("checkpoint").click()
    page.get_by_role("option", name="checkpoint-4").click()
    page.wait_for_function("document.querySelector('#ema-info').innerText.includes('EMA step 4')", timeout=30_000)
    pair = load_pair(find_checkpoints(full_run / "checkpoint-4")[0], device="cpu")
    expected = generate_pair(pair, PROMPT, GenerationSettings(max_new_tokens=12, greedy=True))
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
    page.get_by_text("`prompt` must not be empty").first.wait_for(timeout=30_000)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#max-new-tokens input").fill("100000")
    page.locator("#generate").click()
    page.get_by_text("`max_new_tokens` must be between 1 and 512, got 100000").first.wait_for(timeout=30_000)
    page.locator("#max-new-tokens input").fill("8")
    page.locator("#seed input").fill("-3")
    page.locator("#generate").click()
    page.get_by_text("`seed` must be between 0 and 4294967295, got -3").first.wait_for(timeout=30_000)
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
        client.submit(prompt=PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=s.seed, api_name="/generate")
        for s in settings
    ]
    results = [tuple(job.result(timeout=300)) for job in jobs]
    # Each request samples with its own seeded generators, so running them at once changes nothing.
    pair = load_pair(find_checkpoints(full_run)[-1], device="cpu")
    assert results == [generate_pair(pair, PROMPT, s) for s in settings]
    assert len(set(results)) > 1


def test_bad_client_requests_get_errors_and_server_keeps_serving(full_run, full_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(full_app, verbose=False)
    bad = [
        ({"prompt": "  "}, "`prompt` must not be empty"),
        ({"prompt": PROMPT, "max_new_tokens": 10_000}, "`max_new_tokens` must be between 1 and 512, got 10000"),
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
    assert tuple(out["good"]) == direct_greedy(full_run, lora=False, max_new_tokens=8)


def test_demo_command_trains_then_serves_headless(tmp_path):
    """`hf-ema demo` (what `bash scripts/demo.sh` runs) with HF_EMA_DEMO_EXIT_AFTER_START=1, on a tiny budget."""
    out = tmp_path / "tiny"
    env = {
        **os.environ,
        "HF_EMA_DEMO_EXIT_AFTER_START": "1",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    cmd = [sys.executable, "-m", "hf_ema", "demo", "--output-dir", str(out), "--max-steps", "4", "--save-steps", "2"]
    cmd += ["--port", str(free_port())]
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

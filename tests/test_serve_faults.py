"""The app under a hostile user: concurrent requests that each load a variant, a variant that cannot be computed, a
prompt longer than the model's context, a bounded variant cache, and no temporary folder left after SIGTERM.

Every test here runs the real app server (Gradio, on a free localhost port) and talks to it through `gradio_client`,
as a user's script would; expected texts come from the variants built and loaded independently with hf_ema's public
API and transformers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _app_page import free_port

from hf_ema.utils.paths import MARKER_NAME
from serve.launch import start_app
from serve.specs import VariantSpec

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The for statement"
NEW_TOKENS = 8


def compare_request(client, variant: str, prompt: str = PROMPT, max_new_tokens: int = NEW_TOKENS):
    """Submit a greedy `/compare` request for the one variant `variant`; returns the job."""
    return client.submit(
        prompt=prompt, variants=[variant], max_new_tokens=max_new_tokens, greedy=True, api_name="/compare"
    )


def pane_text(result) -> str:
    """The first pane's text in a `/compare` result."""
    return result["texts"][0]


def expected_text(run: Path, variant: str, tmp_path: Path, tokenizer) -> str:
    """The variant's greedy continuation, built with hf_ema's public API and run with `generate`."""
    from transformers import AutoModelForCausalLM

    from hf_ema import merge_checkpoints, reconstruct

    spec = VariantSpec.parse(variant)
    if spec.kind == "posthoc":
        folder = reconstruct(
            run, sigma_rel=spec.sigma_rel, out_dir=tmp_path / variant.replace(":", "_"), progress=False
        )
    elif spec.kind == "merge":
        steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))[-spec.k :]
        chosen = [run / f"checkpoint-{s}" for s in steps]
        folder = merge_checkpoints(chosen, tmp_path / variant.replace(":", "_"), method=spec.method, progress=False)
    else:
        folder = run / spec.checkpoint / "ema"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


CONCURRENT = [
    "posthoc:0.05",
    "posthoc:0.07",
    "posthoc:0.08",
    "posthoc:0.12",
    "posthoc:0.2",
    "ema@checkpoint-4",
    "ema@checkpoint-8",
    "ema@checkpoint-12",
]
THEN = ["posthoc:0.1", "merge:mean:2", "posthoc:0.15"]


def test_concurrent_requests_each_loading_a_variant(posthoc_run, tmp_path, tokenizer):
    """8 `/compare` requests at once on a fresh server, each needing a different variant loaded (post-hoc widths
    reconstructed and other checkpoints' EMAs), then 3 one after another: all succeed and every text is the
    variant's own `generate`. (Without one lock around every model load, concurrent `from_pretrained` calls leave
    transformers' `tie_weights` a no-op and every later load fails with "Cannot copy out of meta tensor".)"""
    from gradio_client import Client

    expected = {v: expected_text(posthoc_run, v, tmp_path, tokenizer) for v in CONCURRENT + THEN}
    demo, url = start_app(posthoc_run, port=free_port(), device="cpu")
    try:
        client = Client(url, verbose=False)
        jobs = {variant: compare_request(client, variant) for variant in CONCURRENT}
        results = {}
        for variant, job in jobs.items():
            try:
                results[variant] = pane_text(job.result(timeout=600))
            except Exception as err:  # noqa: BLE001 (collected: the assertion below names every failure)
                results[variant] = f"FAILED: {type(err).__name__}: {err}"
        for variant in THEN:
            results[variant] = pane_text(compare_request(client, variant).result(timeout=600))
    finally:
        demo.close()
    assert results == expected


def test_variant_cache_holds_at_most_its_bound(posthoc_run, tmp_path):
    """50 requests with varying variants (post-hoc widths, merges, other checkpoints' EMAs): the cache folder never
    holds more than its bound in folders or bytes, and the folders it keeps are the most recently used."""
    from gradio_client import Client

    from hf_ema import reconstruct

    one = reconstruct(posthoc_run, sigma_rel=0.1, out_dir=tmp_path / "one", progress=False)
    folder_bytes = sum(f.stat().st_size for f in one.rglob("*") if f.is_file())
    max_bytes = int(2.5 * folder_bytes)  # at most two folders fit
    cache = tmp_path / "cache"
    demo, url = start_app(
        posthoc_run, port=free_port(), device="cpu", cache_dir=cache, max_cached_variants=3, max_cache_size=max_bytes
    )
    variants = [f"posthoc:{0.05 + 0.004 * i:g}" for i in range(44)] + ["merge:mean:2", "merge:wsm:3", "merge:mean:3"]
    variants += ["ema@checkpoint-4", "ema@checkpoint-8", "merge:wsm:2"]
    seen_max = 0
    try:
        client = Client(url, verbose=False)
        for variant in variants:
            result = compare_request(client, variant, max_new_tokens=2).result(timeout=600)
            assert pane_text(result), (variant, result["panes"][0]["error"])
            folders = [f for f in cache.iterdir() if f.is_dir()]
            seen_max = max(seen_max, len(folders))
            assert len(folders) <= 2, folders
            assert sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file()) <= max_bytes
    finally:
        demo.close()
    assert len(variants) == 50 and seen_max == 2
    kept = sorted((f / MARKER_NAME).is_file() for f in cache.iterdir())
    assert kept == [True, True]  # the last merges, built by the app, kept in the folder the user named


def test_unbuildable_variant_is_one_line_in_its_pane(posthoc_run, capfd):
    """`posthoc:1e-300` (a width too small to compute): that pane gives a one-line reason, the other pane still
    generates, and the server log holds no traceback; a 200 KB prompt is one message that says how much too long it
    is for the model's context."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    demo, url = start_app(posthoc_run, port=free_port(), device="cpu")
    try:
        client = Client(url, verbose=False)
        capfd.readouterr()
        result = client.predict(
            prompt=PROMPT, variants=["raw", "posthoc:1e-300"], max_new_tokens=6, api_name="/compare"
        )
        error = result["panes"][1]["error"]
        assert "`sigma_rel`" in error and "got 1e-300" in error and "\n" not in error, error
        assert result["texts"][0] and result["scored"] == [0]  # the raw pane still ran
        err = capfd.readouterr().err
        assert "Traceback" not in err, err
        long_prompt = "The for statement " * 11_000  # about 200 KB
        with pytest.raises(AppError) as info:
            client.predict(prompt=long_prompt, variants=["raw"], max_new_tokens=6, api_name="/compare")
        message = str(info.value)
        assert "`prompt` is too long for the model's context of 256 tokens: it is " in message, message
        assert "more than leave room for one new token" in message and "at most 0" not in message
    finally:
        demo.close()


def serve_process(run: Path, tmpdir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m serve RUN` (what `hf-ema serve RUN` runs) with its own temporary folder; waits until it answers."""
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "serve", str(run), "--port", str(port), "--device", "cpu", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the app did not start")


@pytest.mark.parametrize("named_cache", [False, True], ids=["temporary", "named"])
def test_sigterm_leaves_no_temporary_folder(posthoc_run, tmp_path, named_cache):
    """The server stopped by SIGTERM after building a post-hoc variant (and drawing the loss plot) leaves no
    `hf_ema_serve_*` folder behind; a cache folder the user named is kept, with what was built in it."""
    from gradio_client import Client

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    cache = tmp_path / "kept"
    proc, url = serve_process(posthoc_run, tmpdir, *(["--cache-dir", str(cache)] if named_cache else []))
    try:
        result = compare_request(Client(url, verbose=False), "posthoc:0.1").result(timeout=600)
        assert pane_text(result)
        assert any(tmpdir.glob("hf_ema_serve_*")) != named_cache  # the temporary cache exists while serving
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not list(tmpdir.glob("hf_ema_serve_*"))
    if named_cache:
        assert [(f / MARKER_NAME).is_file() for f in cache.iterdir()] == [True]

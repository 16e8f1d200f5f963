"""The app's API through `gradio_client`, as a user's script calls it: `/compare` and `/generate` by parameter names,
their structured results against the variants built and run independently, and the example in the app guide, run as
it is written there."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from _app_page import free_port
from test_serve_compare import FOUR, independent_models, own_scores

from serve.launch import start_app

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guides" / "app.md"
PROMPT = "The return value of"


@pytest.fixture(scope="module")
def app_url(posthoc_run):
    demo, url = start_app(posthoc_run, port=free_port(), device="cpu")
    yield url
    demo.close()


def test_compare_by_parameter_names_returns_the_structured_result(posthoc_run, app_url, tmp_path):
    """Four variants by name: each pane's text and tokens are what `generate` gives with the independently built
    weights, `scores` is what `model(input_ids, labels=...)` gives, `divergence` the first differing token."""
    from gradio_client import Client
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(posthoc_run)
    models = independent_models(posthoc_run, False, tmp_path)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    result = Client(app_url, verbose=False).predict(
        prompt=PROMPT, variants=FOUR, reference=" the function", max_new_tokens=10, greedy=True, api_name="/compare"
    )
    assert [pane["variant"] for pane in result["panes"]] == FOUR and result["scored"] == [0, 1, 2, 3]
    expected = []
    for model in models:
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)
        expected.append(out[0, len(prompt_ids) :].tolist())
    assert [pane["tokens"] for pane in result["panes"]] == expected
    assert result["texts"] == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    reference = tokenizer(" the function", add_special_tokens=False)["input_ids"]
    for i, model in enumerate(models):
        for j, tokens in enumerate(expected):
            assert result["scores"][i][j] == pytest.approx(own_scores(model, prompt_ids, tokens)[0], abs=1e-5)
        assert result["reference_scores"][i] == pytest.approx(own_scores(model, prompt_ids, reference)[0], abs=1e-5)
        assert result["panes"][i]["token_probs"] == pytest.approx(own_scores(model, prompt_ids, expected[i])[1])
    first = next((k for k in range(10) if len({tuple(t[k : k + 1]) for t in expected}) > 1), None)
    assert result["divergence"] == first
    assert result["panes"][2]["command"].startswith(f"hf-ema posthoc {posthoc_run} --sigma-rel 0.15")


def test_generate_by_parameter_names(posthoc_run, app_url):
    """`/generate`: the raw and the EMA text, with the defaults the page uses for everything not given."""
    from gradio_client import Client

    result = Client(app_url, verbose=False).predict(prompt=PROMPT, max_new_tokens=6, api_name="/generate")
    assert [pane["variant"] for pane in result["panes"]] == ["raw", "ema"]
    assert all(result["texts"]) and len(result["scores"]) == 2
    assert [pane["error"] for pane in result["panes"]] == ["", ""]


def guide_example() -> str:
    """The `gradio_client` example of the app guide: the python block under its "From a script" heading."""
    text = GUIDE.read_text()
    section = text.split("## From a script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_guide_example_runs_as_written(app_url):
    """The guide's example, pointed at this server, prints each pane's variant and text, the scores and the first
    divergence."""
    code = guide_example()
    assert 'Client("http://127.0.0.1:7860/")' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("http://127.0.0.1:7860/", app_url), str(GUIDE), "exec"), {})
    # The client says "Loaded as API: ..." first.
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("Loaded as API")]
    assert [line.split(" | ")[0] for line in lines[:3]] == ["raw", "ema", "posthoc:0.15"], lines
    assert lines[3].startswith("scores: [[") and lines[4].startswith("first divergence: ")

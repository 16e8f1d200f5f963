"""The examples run end to end (shortened) on the offline tiny model, so they cannot rot."""

from __future__ import annotations

import ast
import builtins
import importlib.util
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_equal_to_the_ema(loaded: dict, ema) -> None:
    """Every tensor of the EMA (in the model's dtype, as `save_pretrained` writes it) is in `loaded`, equal."""
    import torch

    expected = ema.full_state_dict(dtype="model")
    assert expected and set(expected) <= set(loaded), sorted(set(expected) - set(loaded))
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.slow
def test_finetune_example(tmp_path):
    """`ema/` and `checkpoint-6/ema/` load with `from_pretrained` and hold exactly the EMA the run ended with."""
    result = _load("finetune_causal_lm").main(["--output-dir", str(tmp_path), "--max-steps", "6", "--batch-size", "4"])
    ema = result["ema"]
    assert ema.num_updates == 6
    for folder in (tmp_path / "ema", tmp_path / "checkpoint-6" / "ema"):
        loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        _assert_equal_to_the_ema(loaded.state_dict(), ema)
    # The EMA moved away from the raw weights it started from (a run of 6 steps at decay 0.99).
    assert result["eval_loss"] != result["eval_ema_loss"]


@pytest.mark.slow
def test_lora_example(tmp_path):
    """`ema/` is a PEFT adapter that loads with `PeftModel.from_pretrained` and holds exactly the adapter's EMA."""
    from peft import PeftModel

    from hf_ema.demo.toy import tiny_causal_lm, train_tokenizer

    example = _load("lora_causal_lm")
    result = example.main(["--output-dir", str(tmp_path), "--max-steps", "6", "--batch-size", "4"])
    ema = result["ema"]
    assert ema.num_updates == 6 and all("lora_" in name for name in ema.names)
    base = tiny_causal_lm(train_tokenizer(), hidden_size=128, num_layers=4, seed=0)
    loaded = PeftModel.from_pretrained(base, result["ema_dir"])
    _assert_equal_to_the_ema(loaded.state_dict(), ema)


@pytest.mark.slow
def test_diffusers_unet_example(tmp_path):
    """The diffusers example: `ema/` loads with `UNet2DModel.from_pretrained` and equals the EMA (max abs diff 0),
    `load_ema` restores it, and a run resumed from an `accelerator.save_state` checkpoint (the EMA restored by the
    load-state hook) ends with the uninterrupted run's EMA."""
    import torch

    diffusers = pytest.importorskip("diffusers")
    from hf_ema import ModelEMA, load_ema

    example = _load("diffusers_unet")
    args = ["--max-steps", "6", "--save-every", "3", "--batch-size", "4"]
    full = example.main([*args, "--output-dir", str(tmp_path / "full")])
    loaded = diffusers.UNet2DModel.from_pretrained(full["ema_dir"]).state_dict()
    expected = full["ema"].full_state_dict(dtype="model")
    assert set(expected) <= set(loaded)
    assert max(float((loaded[k] - v).abs().max()) for k, v in expected.items()) == 0.0
    fresh = ModelEMA(example.tiny_unet(seed=1), decay=0.99)
    assert load_ema(fresh, full["ema_dir"])["step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow, full["ema"].shadow))
    assert (tmp_path / "full" / "checkpoint-3" / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    resumed = example.main(
        [*args, "--output-dir", str(tmp_path / "resumed"), "--resume-from", str(tmp_path / "full" / "checkpoint-3")]
    )
    assert resumed["ema"].step == 6
    assert all(torch.equal(a, b) for a, b in zip(resumed["ema"].shadow, full["ema"].shadow))


@pytest.mark.slow
@pytest.mark.trainer
def test_quickstart(tmp_path):
    """examples/quickstart.py, shortened to 12 steps: the best checkpoint is the one with the lowest `eval_ema_loss`;
    the resumed run's EMA equals the uninterrupted run's bit for bit; `ema/` loads with `from_pretrained` and equals
    the EMA the callback held; `pipeline` generates from it; the post-hoc EMA and the merge are the weighted sums
    their recipes name, recomputed here from the snapshot and checkpoint files."""
    import json
    import math

    import torch
    from safetensors.torch import load_file

    source = (EXAMPLES / "quickstart.py").read_text()
    assert "hf_ema.demo" not in source  # a template for a user's own script: built from transformers' own classes
    out = tmp_path / "qs"
    result = _load("quickstart").main(["--output-dir", str(out), "--max-steps", "12", "--save-steps", "4"])

    state = result["trainer"].state
    evals = [(e["eval_ema_loss"], e["step"]) for e in state.log_history if "eval_ema_loss" in e]
    assert [step for _, step in evals] == [4, 8, 12]
    best_loss, best_step = min(evals)
    assert state.best_metric == best_loss
    assert state.best_model_checkpoint == str(out / f"checkpoint-{best_step}")

    assert result["resume_from"] == str(out / "checkpoint-4")
    assert result["resumed_trainer"].state.global_step == 12
    final, resumed = result["final_ema"], result["resumed_ema"]
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[name], resumed[name]) for name in final)

    loaded = AutoModelForCausalLM.from_pretrained(out / "ema").state_dict()
    assert final.keys() <= loaded.keys()
    assert all(torch.equal(loaded[name], final[name]) for name in final)
    assert result["sample"].startswith("The for statement") and len(result["sample"]) > len("The for statement")

    def weighted_sum(entries, folder_of):
        tensors = [(entry["weight"], load_file(str(folder_of(entry) / "model.safetensors"))) for entry in entries]
        return {name: sum(w * t[name].double() for w, t in tensors) for name in tensors[0][1]}

    recipe = json.loads((result["posthoc"] / "posthoc_recipe.json").read_text())
    assert recipe["step"] == 12 and {sn["step"] for sn in recipe["snapshots"]} == {4, 8, 12}
    want = weighted_sum(recipe["snapshots"], lambda entry: Path(entry["path"]))
    got = AutoModelForCausalLM.from_pretrained(result["posthoc"]).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=0, atol=1e-5)

    recipe = json.loads((result["merged"] / "merge_recipe.json").read_text())
    assert [entry["step"] for entry in recipe["checkpoints"]] == [4, 8, 12] and recipe["method"] == "wsm"
    want = weighted_sum(recipe["checkpoints"], lambda entry: Path(entry["weights_from"]))
    got = AutoModelForCausalLM.from_pretrained(result["merged"]).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=0, atol=1e-5)

    losses = result["losses"]
    assert set(losses) == {"raw", "EMA", "post-hoc EMA sigma_rel=0.15", "WSM merge of 3 checkpoints"}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["EMA"] == pytest.approx(evals[-1][0], rel=1e-4)  # the EMA evaluated again from its folder


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _calls(code: str) -> dict[str, list[ast.Call]]:
    """Every call in `code`, by its dotted name (`EMACallback`, `hf_ema.reconstruct`, `trainer.train`)."""
    out: dict[str, list[ast.Call]] = {}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            out.setdefault(ast.unparse(node.func), []).append(node)
    return out


def _keywords(calls: list[ast.Call]) -> dict[str, str]:
    return {kw.arg: ast.unparse(kw.value) for call in calls for kw in call.keywords if kw.arg is not None}


def test_readme_quickstart_defines_every_name_and_is_the_script():
    """The README's quickstart uses no name it does not define or import, and makes the calls of
    `examples/quickstart.py` (which `test_quickstart` runs): the same callback, best metric, resume, loading,
    post-hoc EMA and merge."""
    section = (ROOT / "README.md").read_text().split("\n## Quickstart\n")[1].split("\n## ")[0]
    code = _python_blocks(section)[0]
    defined, used = set(dir(builtins)), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    assert used <= defined, sorted(used - defined)

    readme, script = _calls(code), _calls((EXAMPLES / "quickstart.py").read_text())
    for name in (
        "Dataset.from_dict",
        "TrainingArguments",
        "Trainer",
        "DataCollatorForLanguageModeling",
        "EMACallback",
        "AutoModelForCausalLM.from_pretrained",
        "pipeline",
        "hf_ema.reconstruct",
        "hf_ema.merge_checkpoints",
    ):
        assert name in readme and name in script, name
    for name, keyword, value in (
        ("EMACallback", "posthoc", "True"),
        ("TrainingArguments", "metric_for_best_model", "'eval_ema_loss'"),
        ("TrainingArguments", "eval_strategy", "'steps'"),
        ("hf_ema.merge_checkpoints", "method", "'wsm'"),
    ):
        assert _keywords(readme[name]).get(keyword) == value == _keywords(script[name]).get(keyword), (name, keyword)
    for calls in (readme, script):
        assert "resume_from_checkpoint" in _keywords(
            [c for n, cs in calls.items() if n.endswith(".train") for c in cs]
        )


def test_getting_started_walks_through_the_quickstart():
    """Every code block of the getting-started walk-through is a contiguous excerpt of `examples/quickstart.py`."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    section = page.split("\n## Your first run")[1].split("\n## ")[0]
    script = [line.strip() for line in (EXAMPLES / "quickstart.py").read_text().splitlines() if line.strip()]
    blocks = _python_blocks(section)
    assert len(blocks) >= 5
    for block in blocks:
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        starts = [i for i, line in enumerate(script) if line == lines[0]]
        assert any(script[i : i + len(lines)] == lines for i in starts), block

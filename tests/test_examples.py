"""The examples run end to end (shortened) on the offline tiny model, so they cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_example(tmp_path):
    result = _load("finetune_causal_lm").main(["--output-dir", str(tmp_path), "--max-steps", "6", "--batch-size", "4"])
    assert result["eval_loss"] != result["eval_ema_loss"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "ema")
    assert (tmp_path / "checkpoint-6" / "ema" / "ema_state.json").is_file()


@pytest.mark.slow
def test_lora_example(tmp_path):
    result = _load("lora_causal_lm").main(["--output-dir", str(tmp_path), "--max-steps", "6", "--batch-size", "4"])
    assert result["eval_loss"] != result["eval_ema_loss"]
    assert (tmp_path / "ema" / "adapter_model.safetensors").is_file()

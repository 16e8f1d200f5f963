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

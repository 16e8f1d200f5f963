"""ema/ folders: save_pretrained-loadable, exact round trip, atomic under an injected fault."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_ema import CheckpointError, ModelEMA, load_ema, read_ema_state, save_ema


def _nudge(model, amount):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def test_save_load_round_trip_fp32(tmp_path, tiny_model, tokenizer):
    ema = ModelEMA(tiny_model, decay=0.5)
    _nudge(tiny_model, 0.25)
    ema.update()
    save_ema(ema, tmp_path / "ema", processing_class=tokenizer)
    files = {p.name for p in (tmp_path / "ema").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "ema_state.json", "tokenizer.json"} <= files
    # fp32 model: the weights file holds the EMA exactly, so no second copy is written.
    assert "ema_state.safetensors" not in files
    state = read_ema_state(tmp_path / "ema")
    assert state["step"] == 1 and state["num_updates"] == 1 and state["decay"] == 0.5
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ema", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in zip(ema.names, ema.shadow):
        assert torch.equal(loaded.state_dict()[name], value), name
    # Tied embeddings stay tied to the EMA value.
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)

    fresh = ModelEMA(tiny_model, decay=0.5)
    load_ema(fresh, tmp_path / "ema")
    assert fresh.step == 1 and fresh.num_updates == 1
    for a, b in zip(ema.shadow, fresh.shadow):
        assert torch.equal(a, b)


def test_bf16_model_saves_exact_fp32_state(tmp_path, tiny_model):
    model = tiny_model.to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.999)
    _nudge(model, 0.5)
    ema.update()
    save_ema(ema, tmp_path / "ema")
    weights = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    exact = load_file(str(tmp_path / "ema" / "ema_state.safetensors"))
    assert exact["model.embed_tokens.weight"].dtype == torch.float32
    fresh = ModelEMA(model, decay=0.999)
    load_ema(fresh, tmp_path / "ema")
    for a, b in zip(ema.shadow, fresh.shadow):
        assert torch.equal(a, b)


class _ExplodingTokenizer:
    """Fails half-way through a save, after the weights are written."""

    def save_pretrained(self, folder):
        (folder / "half_written.txt").write_text("partial")
        raise OSError("disk full (injected)")


def test_fault_mid_write_keeps_previous_folder_and_leaves_no_partial(tmp_path, tiny_model):
    ema = ModelEMA(tiny_model, decay=0.5)
    save_ema(ema, tmp_path / "ema")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ema").iterdir()}
    _nudge(tiny_model, 1.0)
    ema.update()
    in_memory = [t.clone() for t in ema.shadow]
    with pytest.raises(OSError, match="injected"):
        save_ema(ema, tmp_path / "ema", processing_class=_ExplodingTokenizer())
    after = {p.name: p.read_bytes() for p in (tmp_path / "ema").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no temporary folder left behind
    for a, b in zip(in_memory, ema.shadow):  # the EMA in memory is not lost either
        assert torch.equal(a, b)


def test_load_rejects_foreign_folders(tmp_path, tiny_model):
    ema = ModelEMA(tiny_model)
    with pytest.raises(CheckpointError, match="ema_state.json is missing"):
        load_ema(ema, tmp_path)
    save_ema(ema, tmp_path / "ema")
    meta = json.loads((tmp_path / "ema" / "ema_state.json").read_text())
    meta["format_version"] = 999
    (tmp_path / "ema" / "ema_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer hf-ema"):
        load_ema(ema, tmp_path / "ema")

"""ema/ folders: save_pretrained-loadable, exact round trip, atomic under an injected fault."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_ema import CheckpointError, ModelEMA, load_ema, read_ema_state, save_ema

# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it builds a `PeftModel`: a warning
# between two upstreams, not about anything hf-ema calls.
PEFT_READS_DEPRECATED = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


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


# ---------------------------------------------------------------------------------------------------- format 2
def _ema_of(model, amount=0.25):
    ema = ModelEMA(model, decay=0.5)
    _nudge(model, amount)
    ema.update()
    return ema


def _ema_state_dict(ema):
    """The EMA in the model's dtypes under every name `state_dict` has (tied aliases too), as `save_pretrained`
    would be given it."""
    state = ema.full_state_dict(dtype="model")
    for name, aliases in ema.selection.aliases.items():
        for alias in aliases:
            state[alias] = state[name]
    return state


def _weights_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json"))}


def _data_bytes(folder):
    from hf_ema.utils.safetensors_files import read_header

    return sum(p.stat().st_size - read_header(p)[0] for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("dtype", "max_shard_size"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "60KB"), (torch.bfloat16, "60KB")],
)
def test_weights_are_what_save_pretrained_writes(tmp_path, tokenizer, dtype, max_shard_size):
    """The weights files (split by `max_shard_size` into `model-0000i-of-0000N` + index) are byte for byte what
    transformers' `save_pretrained` writes when given the EMA; they load with no missing or unexpected key; the
    EMA resumes bit for bit; the folder takes 4 bytes a parameter (fp32) or 2 + 4 (bf16: the exact fp32 EMA)."""
    from hf_ema.demo.toy import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).to(dtype)
    ema = _ema_of(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    save_ema(ema, tmp_path / "ema", **kwargs)
    model.save_pretrained(tmp_path / "reference", state_dict=_ema_state_dict(ema), **kwargs)
    ours, reference = _weights_files(tmp_path / "ema"), _weights_files(tmp_path / "reference")
    assert ours.keys() - {n for n in ours if n.startswith("ema_state")} == reference.keys()
    assert all(ours[name] == data for name, data in reference.items())
    if max_shard_size:
        assert "model.safetensors.index.json" in ours and len(reference) > 2
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "ema" / name).read_text() == (tmp_path / "reference" / name).read_text()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ema", output_loading_info=True, dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    fresh = ModelEMA(model, decay=0.5)
    meta = load_ema(fresh, tmp_path / "ema")
    assert meta["format_version"] == 2 and meta["exact_tensors"] == (dtype == torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow))
    numel = sum(t.numel() for t in ema.shadow + ema.copied)
    assert _data_bytes(tmp_path / "ema") == (4 if dtype == torch.float32 else 6) * numel
    assert not (tmp_path / "ema" / "shards").exists()


@PEFT_READS_DEPRECATED
def test_lora_adapter_is_what_peft_writes_and_is_the_only_copy(tmp_path):
    """A LoRA EMA: `adapter_model.safetensors` byte for byte as PEFT writes it, loadable with
    `PeftModel.from_pretrained`, and (fp32 adapters) the only copy of the EMA, read back on resume."""
    import sys
    from pathlib import Path

    from peft import PeftModel

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
    import common

    model = common.build_lora_model()
    ema = _ema_of(model)
    save_ema(ema, tmp_path / "ema")
    model.save_pretrained(tmp_path / "reference", state_dict=_ema_state_dict(ema))
    assert _weights_files(tmp_path / "ema") == _weights_files(tmp_path / "reference")
    loaded = PeftModel.from_pretrained(common.build_model(seed=0), tmp_path / "ema")
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(lora) == set(ema.names)
    assert all(torch.equal(lora[n], t) for n, t in zip(ema.names, ema.shadow))
    fresh = ModelEMA(common.build_lora_model(), decay=0.5)
    load_ema(fresh, tmp_path / "ema")
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow))
    # PEFT loads one adapter file only: a small `max_shard_size` does not split it.
    save_ema(ema, tmp_path / "small", max_shard_size=1000)
    assert _weights_files(tmp_path / "small") == _weights_files(tmp_path / "ema")


def _unet(dtype=torch.float32):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
    import common

    return common.build_unet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_model_saves_the_ema(tmp_path, dtype):
    """diffusers' `save_pretrained` ignores `state_dict`: the EMA is swapped in while it writes, so
    `UNet2DModel.from_pretrained` gets the EMA (max abs diff 0), `load_ema` restores it, and the model keeps its
    own weights."""
    diffusers = pytest.importorskip("diffusers")
    model = _unet(dtype)
    ema = _ema_of(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    save_ema(ema, tmp_path / "ema")
    assert (tmp_path / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "ema", torch_dtype=dtype).state_dict()
    expected = ema.full_state_dict(dtype="model")
    assert max(float((loaded[k].float() - v.float()).abs().max()) for k, v in expected.items()) == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.items())
    fresh = ModelEMA(_unet(dtype), decay=0.5)
    meta = load_ema(fresh, tmp_path / "ema")
    assert meta["exact_tensors"] == (dtype == torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow)) and fresh.step == 1


def test_plain_module_tied_weights_stored_once(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False), torch.nn.BatchNorm1d(7))
    model[1].weight = model[0].weight
    ema = _ema_of(model)
    save_ema(ema, tmp_path / "ema")
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert set(saved) == {"0.weight", "2.weight", "2.bias", "2.running_mean", "2.running_var", "2.num_batches_tracked"}
    fresh = ModelEMA(model, decay=0.5)
    load_ema(fresh, tmp_path / "ema")
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow + ema.copied, fresh.shadow + fresh.copied))


def test_reads_format_1_folders(tmp_path, tiny_model):
    """A folder written by hf-ema's format 1 (a bf16 model: `model.safetensors` in bf16 and the fp32 EMA in
    `ema_state.safetensors`, no tensor map in `ema_state.json`) still resumes exactly."""
    from safetensors.torch import save_file

    model = tiny_model.to(torch.bfloat16)
    ema = _ema_of(model)
    folder = tmp_path / "ema"
    model.save_pretrained(folder, state_dict=_ema_state_dict(ema))
    save_file(
        {k: v.contiguous() for k, v in ema.full_state_dict(dtype="ema").items()}, str(folder / "ema_state.safetensors")
    )
    meta = {"format_version": 1, "step": 1, "num_updates": 1, "decay": 0.5, "names": ema.names}
    (folder / "ema_state.json").write_text(json.dumps(meta))
    fresh = ModelEMA(model, decay=0.5)
    load_ema(fresh, folder)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow)) and fresh.num_updates == 1


def test_bad_save_arguments_fail_before_any_work(tmp_path, tiny_model):
    from hf_ema import ConfigError
    from hf_ema.errors import ConfigTypeError

    ema = ModelEMA(tiny_model)
    with pytest.raises(ConfigError, match="`max_shard_size` .* got '5 parsecs'"):
        save_ema(ema, tmp_path / "ema", max_shard_size="5 parsecs")
    with pytest.raises(ConfigError, match="max_shard_size"):
        save_ema(ema, tmp_path / "ema", max_shard_size=0)
    with pytest.raises(ConfigTypeError, match="shared_filesystem"):
        save_ema(ema, tmp_path / "ema", shared_filesystem="yes")
    assert not (tmp_path / "ema").exists() and list(tmp_path.iterdir()) == []


def test_fault_while_writing_tensors_keeps_previous_folder(tmp_path, tiny_model, monkeypatch):
    """A disk error while the tensors are written (injected into the write of the second tensor): the previous
    `ema/` stays as it was and no temporary folder is left."""
    import hf_ema.ema_folder.parts as ema_folder_parts

    ema = _ema_of(tiny_model)
    save_ema(ema, tmp_path / "ema")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ema").iterdir()}
    _nudge(tiny_model, 1.0)
    ema.update()
    calls = []
    real = ema_folder_parts.write_elements

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ema_folder_parts, "write_elements", failing)
    with pytest.raises(OSError, match="injected"):
        save_ema(ema, tmp_path / "ema")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ema").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]


def test_safetensors_files_written_in_pieces_equal_save_file(tmp_path):
    """The header computed from names, dtypes and shapes, and tensors written as several ranks would (a range
    each, cast on the way), give the bytes `safetensors.torch.save_file` writes."""
    import os

    from safetensors.torch import save_file

    from hf_ema.utils.safetensors_files import TensorSpec, create_file, file_layout, parse_size, write_elements

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=gen),
        "a.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "h": torch.randn(9, generator=gen).to(torch.float16),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        'ü"x': torch.randn(2, generator=gen),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    layout = file_layout(
        "x.safetensors", [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"}
    )
    create_file(tmp_path / "x.safetensors", layout)
    fd = os.open(tmp_path / "x.safetensors", os.O_WRONLY)
    try:
        for key, value in tensors.items():
            flat, size = value.reshape(-1), value.element_size()
            for start, end in ((0, flat.numel() // 3), (flat.numel() // 3, flat.numel())):  # two "ranks"
                source = flat[start:end].double() if value.is_floating_point() else flat[start:end]
                write_elements(fd, layout.offsets[key] + start * size, source, value.dtype)
    finally:
        os.close(fd)
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2**21 and parse_size(7) == 7

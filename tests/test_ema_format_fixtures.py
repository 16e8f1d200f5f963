"""Format-2 `ema/` folders written by an earlier hf-ema (tests/fixtures/ema_format2/, see its `make_fixtures.py`):
they resume bit for bit, and hf-ema today writes the same bytes for the same EMA, so a reader of either reads the
other alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_ema import EMAConfig, ModelEMA, load_ema, save_ema

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ema_format2"
sys.path.insert(0, str(FIXTURES))

from fixture_models import DECAY, SPLIT_BYTES, STEPS, reference, tiny_llama, tiny_module, train_ema  # noqa: E402

#: Fixture folder -> (model builder, `save_ema` keyword arguments of the same save in one process).
LAYOUTS = {
    "llama_bf16": (tiny_llama, {}),
    "llama_bf16_split": (tiny_llama, {"max_shard_size": SPLIT_BYTES}),
    "module_bf16": (tiny_module, {}),
    # Written by 2 DDP ranks, each its part of each file: the same files as one process writes.
    "llama_bf16_ddp_sharded": (tiny_llama, {}),
}
#: `ema_state.json` entries that say which process wrote the folder, not what it holds.
WRITER_KEYS = {"hf_ema_version", "layout", "world_size"}


def _equal_to_reference(ema: ModelEMA, ref: dict[str, torch.Tensor]) -> None:
    tensors = ema.state_dict()["tensors"]
    assert set(tensors) == set(ref)
    for name, value in tensors.items():
        expected = ref[name]
        if value.is_floating_point():
            assert value.dtype == torch.float32
            # The float64 reference is exact: every value is a dyadic rational that fp32 holds.
            assert torch.equal(value.to(torch.float64), expected), name
        else:
            assert torch.equal(value, expected), name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fixture_resumes_bit_exact(layout):
    build, _ = LAYOUTS[layout]
    model = build()
    ema = ModelEMA(model, decay=DECAY)
    meta = load_ema(ema, FIXTURES / layout)
    assert meta["format_version"] == 2
    assert (ema.step, ema.num_updates, ema.num_skipped, ema.last_decay) == (len(STEPS), len(STEPS), 0, DECAY)
    _equal_to_reference(ema, reference(model))
    # Some EMA values need more bits than bf16 has: only the exact copy can have restored them.
    assert any(
        (t.bfloat16().float() != t).any() for t in ema.state_dict()["tensors"].values() if t.is_floating_point()
    )


@pytest.mark.parametrize("layout", ["llama_bf16", "llama_bf16_split", "llama_bf16_ddp_sharded"])
def test_fixture_weights_load_with_from_pretrained(layout):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / layout)
    ref = reference(tiny_llama())
    for name, value in model.state_dict().items():
        if name in ref:
            assert torch.equal(value, ref[name].to(torch.bfloat16)), name
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json"))}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_save_today_writes_the_fixture_bytes(tmp_path, layout):
    """The same EMA saved by hf-ema today: the same weights, exact-copy and index files byte for byte, and the same
    `ema_state.json` entries (the fixture's, save those naming the writer), so whatever read the fixture reads it
    alike; and it resumes as exactly."""
    build, kwargs = LAYOUTS[layout]
    model = build()
    ema = train_ema(model)
    save_ema(ema, tmp_path / "ema", **kwargs)
    assert _files(tmp_path / "ema") == _files(FIXTURES / layout)
    old = json.loads((FIXTURES / layout / "ema_state.json").read_text())
    new = json.loads((tmp_path / "ema" / "ema_state.json").read_text())
    for key in set(old) - WRITER_KEYS:
        if key == "config":  # the DDP-sharded writer set `shard_across_ranks`, a setting of the writer too
            old[key].pop("shard_across_ranks")
            new[key].pop("shard_across_ranks")
            # Fields added since the fixture was written read back at their defaults, and are saved so.
            old[key] = {k: v for k, v in EMAConfig.from_dict(old[key]).to_dict().items() if k in new[key]}
        assert new[key] == old[key], key
    fresh = ModelEMA(build(), decay=DECAY)
    load_ema(fresh, tmp_path / "ema")
    _equal_to_reference(fresh, reference(model))

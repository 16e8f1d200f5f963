"""Sharding-aware EMA: FSDP2, FSDP1 (use_orig_params) and the DDP-sharded EMA, on 2 and 4 CPU ranks with gloo.

The multi-process checks run once per module in a few `torchrun` launches (workers in `tests/dist/`); every number
they report is compared here with a single-process run of the same model, seed and data, computed in this process
with a plain (unsharded) `ModelEMA`, and every `ema/` folder they write with the folder one process writes for the
same EMA, byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hf_ema import EMAConfig, ModelEMA, load_ema
from hf_ema.errors import ConfigTypeError
from hf_ema.sharding import ReplicatedLayout, detect_layout
from hf_ema.sharding.ddp import chunk_bounds

DIST = Path(__file__).resolve().parent / "dist"
sys.path.insert(0, str(DIST))

import common  # noqa: E402
from launch import torchrun as _torchrun  # noqa: E402

MODES = ["fsdp2", "fsdp1", "ddp", "lora_fsdp2", "lora_fsdp1"]
#: Every mode the 2-rank worker runs: also ZeRO-3 partitions built by hand and a bf16 model under FSDP2.
SAVED_MODES = [*MODES, "zero3sim", "fsdp2_bf16"]
#: The modes resumed at 4 ranks from their 2-rank checkpoint, then at 2 ranks from the 4-rank one.
CROSS_MODES = ["fsdp2", "fsdp1", "ddp", "zero3sim", "fsdp2_bf16"]
LAYOUT_KIND = {"fsdp2": "fsdp2", "fsdp1": "fsdp1", "ddp": "ddp_sharded", "lora_fsdp2": "fsdp2", "lora_fsdp1": "fsdp1"}


def _read_ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return _safetensors_file(folder / "model.safetensors")


def _single_process_save(mode: str, folder: Path, out: Path, **kwargs) -> Path:
    """What one process writes for the EMA saved in `folder`: the same model, its EMA set to the saved tensors."""
    from hf_ema import save_ema

    model = common.build(mode.replace("zero3sim", "fsdp2"), seed=0)
    ema = ModelEMA(model, decay=common.DECAY)
    meta = json.loads((folder / "ema_state.json").read_text())
    ema.load_state_dict(
        {"tensors": common.saved_ema(folder), "step": meta["step"], "num_updates": meta["num_updates"]}
    )
    save_ema(ema, out, **kwargs)
    return out


def _weights_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json"))}


def _json_files(folder: Path) -> dict[str, dict]:
    # PEFT writes `target_modules` (a set) in hash order: compare it as a set.
    out = {}
    for name in ("config.json", "generation_config.json", "adapter_config.json"):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            if isinstance(data.get("target_modules"), list):
                data["target_modules"] = sorted(data["target_modules"])
            out[name] = data
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it builds a `PeftModel`: a warning
# between two upstreams, not about anything hf-ema calls.
PEFT_READS_DEPRECATED = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# ---------------------------------------------------------------------------------------------------- references
def _reference_run(mode: str) -> dict:
    """The same training on one process, full batch, plain EMA."""
    model = common.build(mode, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LR)
    ema = ModelEMA(model, decay=common.DECAY)
    assert isinstance(ema.layout, ReplicatedLayout)
    data = common.batches()
    out: dict = {"full_bytes": ema.num_bytes(), "numel": sum(t.numel() for t in ema.shadow)}
    for step in range(1, common.STEPS + 1):
        common.train_step(model, optimizer, data[step - 1])
        ema.update()
        if step == common.SAVE_STEP:
            out["ema_at_save"] = {k: v.clone() for k, v in ema.full_state_dict(dtype="ema").items()}
    out["ema_final"] = ema.full_state_dict(dtype="ema")
    out["raw_loss"] = common.eval_loss(model)
    with ema.swapped():
        out["ema_loss"] = common.eval_loss(model)
    return out


@pytest.fixture(scope="module")
def references() -> dict[bool, dict]:
    return {False: _reference_run("fsdp2"), True: _reference_run("lora_fsdp2")}


@pytest.fixture
def reference(references, mode) -> dict:
    return references[mode.startswith("lora_")]


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded_loop")
    _torchrun("ema_worker.py", str(out), ",".join(SAVED_MODES))
    return out


@pytest.fixture(scope="module")
def cross_world(loop_runs, tmp_path_factory) -> dict[int, Path]:
    """The 2-rank checkpoints resumed (and saved again) at 4 ranks, then those resumed at 2 ranks."""
    four, two = tmp_path_factory.mktemp("resumed_at_4"), tmp_path_factory.mktemp("resumed_at_2")
    _torchrun("resume_worker.py", str(loop_runs), str(four), ",".join(CROSS_MODES), nproc=4)
    _torchrun("resume_worker.py", str(four), str(two), ",".join(CROSS_MODES), nproc=2)
    return {4: four, 2: two}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer_ddp")
    _torchrun("trainer_ddp_worker.py", str(out))
    return out


# ---------------------------------------------------------------------------------------------------- in-process
def test_chunk_bounds_match_torch_chunk():
    for numel in (0, 1, 5, 101, 2424):
        for world in (1, 2, 3, 8):
            expected = [c.numel() for c in torch.arange(numel).chunk(world)] if numel else []
            got = [end - start for start, end in (chunk_bounds(numel, r, world) for r in range(world))]
            assert [g for g in got if g] == expected
            assert sum(got) == numel


def test_shard_across_ranks_validated():
    assert EMAConfig(shard_across_ranks=True).shard_across_ranks is True
    assert EMAConfig.from_dict(EMAConfig(shard_across_ranks=False).to_dict()).shard_across_ranks is False
    with pytest.raises(ConfigTypeError, match="shard_across_ranks"):
        EMAConfig(shard_across_ranks="yes")


def test_single_process_stays_replicated():
    model = common.build_model()
    assert detect_layout(model, EMAConfig(shard_across_ranks=True)).kind == "replicated"
    assert ModelEMA(model, shard_across_ranks=True).layout.kind == "replicated"


# ------------------------------------------------------------------------------------------ FSDP2 / FSDP1 / DDP
@PEFT_READS_DEPRECATED
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_saved_ema_matches_single_process(loop_runs, reference, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _read_ranks(loop_runs / mode)
    assert [r["layout"] for r in ranks] == [LAYOUT_KIND[mode]] * 2
    folder = loop_runs / mode / "final" / "ema"
    saved = common.saved_ema(folder)
    expected = reference["ema_final"]
    assert set(expected) <= set(saved)
    assert _max_diff(expected, {k: saved[k] for k in expected}) < 1e-6
    if mode.startswith("lora_"):
        # The adapter only, loadable onto the base model.
        assert not (folder / "model.safetensors").exists()
        assert all("lora_" in k for k in expected)
        state = PeftModel.from_pretrained(common.build_model(seed=0), folder).state_dict()
    else:
        # Loads with from_pretrained, tied lm_head included.
        state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert _max_diff(expected, {k: state[k] for k in expected}) < 1e-6


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_each_rank_holds_half_the_ema(loop_runs, reference, mode):
    ranks = _read_ranks(loop_runs / mode)
    full = reference["full_bytes"]
    per_rank = [r["ema_bytes"] for r in ranks]
    assert sum(per_rank) == full  # no padding, no duplicated tensor
    if mode == "lora_fsdp1":
        # FSDP1 splits each unit's flat parameter in halves: here every adapter tensor lies in rank 0's half, and
        # the EMA follows the adapter wherever it lies.
        return
    assert all(0.45 * full <= b <= 0.55 * full for b in per_rank), (per_rank, full)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_swapped_and_copy_to(loop_runs, reference, mode):
    for r in _read_ranks(loop_runs / mode):
        assert r["swapped_loss"] == pytest.approx(reference["ema_loss"], abs=1e-5)
        assert r["copy_to_loss"] == pytest.approx(reference["ema_loss"], abs=1e-5)
        assert r["raw_loss"] == pytest.approx(reference["raw_loss"], abs=1e-5)
        # After the block the model computes with its raw weights again, bit for bit.
        assert r["raw_loss_after"] == r["raw_loss"]


@PEFT_READS_DEPRECATED
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", SAVED_MODES)
def test_folder_is_what_one_process_writes(loop_runs, tmp_path, mode):
    """Every rank wrote its part of the files in place; the folder is byte for byte the one a single process writes
    for the same EMA (in one file and split by a small `max_shard_size`), also when the parts went through the main
    process (no shared filesystem), and loads with `from_pretrained` with no missing or unexpected key."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for sub, kwargs in (("final", {}), ("split", {"max_shard_size": "20KB"})):
        folder = loop_runs / mode / sub / "ema"
        single = _single_process_save(mode, folder, tmp_path / sub / "ema", **kwargs)
        assert _weights_files(folder) == _weights_files(single)
        assert _json_files(folder) == _json_files(single)
        saved = common.saved_ema(folder)
        if mode.startswith("lora_"):
            model = PeftModel.from_pretrained(common.build_model(seed=0), folder)
            state = {n: p for n, p in model.named_parameters() if "lora_" in n}
            assert set(state) == set(saved)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="auto")
            assert not info["missing_keys"] and not info["unexpected_keys"]
            state = model.state_dict()
            assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
        for name, value in saved.items():
            assert torch.equal(state[name], value.to(state[name].dtype)), name
    split = _weights_files(loop_runs / mode / "split" / "ema")
    if not mode.startswith("lora_"):  # PEFT adapters are one file
        assert len([n for n in split if n.endswith(".safetensors")]) > 2
    assert _weights_files(loop_runs / mode / "streamed" / "ema") == _weights_files(loop_runs / mode / "final" / "ema")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("mode", "limit"), [("fsdp2", 4), ("fsdp2_bf16", 6)])
def test_one_copy_on_disk(loop_runs, mode, limit):
    """An fp32 model's EMA is its weights file (4 bytes a parameter); a bf16 model's, the bf16 weights plus the
    exact fp32 EMA (2 + 4). No per-rank copy."""
    from hf_ema.utils.safetensors_files import read_header

    folder = loop_runs / mode / "final" / "ema"
    data = sum(p.stat().st_size - read_header(p)[0] for p in folder.glob("*.safetensors"))
    numel = sum(v.numel() for k, v in common.saved_ema(folder).items())
    assert data == limit * numel
    assert not (folder / "shards").exists() and not (loop_runs / mode / "ckpt" / "ema" / "shards").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", SAVED_MODES)
def test_resume_at_the_same_world_size_and_from_format_1(loop_runs, mode):
    for r in _read_ranks(loop_runs / mode):
        # Each rank read its own byte ranges back, bit for bit.
        assert r["resume_equal"] is True and r["resume_max_diff"] == 0.0
        assert r["resumed_step"] == common.SAVE_STEP
        # The same EMA in the format-1 layout (per-rank `shards/` files; full weights) resumes exactly too.
        assert r["format1_shards_equal"] is True
        assert r.get("format1_full_equal", True) is True
    # The resumed run ends where the uninterrupted one does.
    resumed, final = loop_runs / mode / "resumed" / "ema", loop_runs / mode / "final" / "ema"
    if (resumed / "ema_state.json").exists():
        assert _max_diff(common.saved_ema(resumed), common.saved_ema(final)) < 1e-6


@PEFT_READS_DEPRECATED
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_resume_in_one_process(loop_runs, reference, mode):
    """A 2-rank checkpoint restores bit for bit in one process (and equals the single-process run to 1e-6)."""
    ckpt = loop_runs / mode / "ckpt" / "ema"
    ema = ModelEMA(common.build(mode, seed=9), decay=common.DECAY)
    meta = load_ema(ema, ckpt)
    assert meta["world_size"] == 2 and meta["layout"] == LAYOUT_KIND[mode]
    assert ema.step == common.SAVE_STEP
    restored = ema.full_state_dict(dtype="ema")
    saved = common.saved_ema(ckpt)
    assert all(torch.equal(restored[k], saved[k]) for k in restored) and set(restored) == set(saved)
    assert _max_diff(restored, reference["ema_at_save"]) < 1e-6


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", CROSS_MODES)
def test_resume_at_another_world_size(loop_runs, cross_world, mode):
    """2 -> 4 -> 2 ranks: each rank restores its part of the saved EMA bit for bit, and saving it again at the new
    world size writes the same bytes; 4 -> 1 in this process."""
    saved = common.saved_ema(loop_runs / mode / "ckpt" / "ema")
    for world, src in ((4, 2), (2, 4)):
        ranks = [json.loads((cross_world[world] / mode / f"rank{r}.json").read_text()) for r in range(world)]
        assert all(r["equal"] is True and r["step"] == common.SAVE_STEP for r in ranks)
        assert all(r["world_size"] == world and r["saved_world_size"] == src for r in ranks)
        folder = cross_world[world] / mode / "ckpt" / "ema"
        assert _weights_files(folder) == _weights_files(loop_runs / mode / "ckpt" / "ema")
    ema = ModelEMA(common.build(mode.replace("zero3sim", "fsdp2"), seed=9), decay=common.DECAY)
    load_ema(ema, cross_world[4] / mode / "ckpt" / "ema")
    restored = ema.full_state_dict(dtype="ema")
    assert set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved)


@pytest.mark.multiprocess
def test_sharded_model_whose_save_pretrained_ignores_state_dict_is_refused(loop_runs):
    """diffusers' `save_pretrained` writes the model's own weights: under FSDP2 (no way to swap the EMA into a full
    model on the main process) `save_ema` raises on every rank and leaves nothing behind."""
    pytest.importorskip("diffusers")
    for r in range(2):
        info = json.loads((loop_runs / f"unet_fsdp2_rank{r}.json").read_text())
        assert info["type"] == "CheckpointError" and "ignores the `state_dict`" in info["message"]
        assert info["left"] == []


@pytest.mark.multiprocess
def test_fsdp1_without_orig_params_is_a_clear_error(loop_runs):
    info = json.loads((loop_runs / "fsdp1_flat_error.json").read_text())
    assert info["type"] == "ConfigError"
    assert "use_orig_params=True" in info["message"]


# ---------------------------------------------------------------------------------------------------- ZeRO-3
@pytest.mark.multiprocess
def test_zero3_layout_on_simulated_partitions(loop_runs):
    """The ZeRO-3 layout against DeepSpeed's documented partitioning, built by hand in the worker
    (`run_zero3_simulation`), with one persistent parameter; the real engine under the Trainer is in
    `tests/test_trainer_engines.py`."""
    from transformers import AutoModelForCausalLM

    out = loop_runs / "zero3sim"
    ranks = _read_ranks(out)
    assert all(r["layout"] == "zero3" for r in ranks)
    full = ranks[0]["full_bytes"]
    assert all(0.45 * full <= r["ema_bytes"] <= 0.55 * full for r in ranks)
    reference = _safetensors_file(out / "reference.safetensors")
    saved = _safetensors(out / "final" / "ema")
    assert _max_diff(reference, {k: saved[k] for k in reference}) < 1e-6
    state = AutoModelForCausalLM.from_pretrained(out / "final" / "ema").state_dict()
    assert _max_diff(reference, {k: state[k] for k in reference}) < 1e-6
    for r in ranks:
        # Inside swapped() the partitions hold the EMA and the persistent parameter's full tensor is refreshed.
        assert r["swap_partition_diff"] == 0.0 and r["swap_persistent_diff"] == 0.0
        assert r["after_persistent_diff"] == 0.0
        assert r["resume_equal"] is True and r["format1_shards_equal"] is True and r["format1_full_equal"] is True


# ---------------------------------------------------------------------------------------------------- Trainer + DDP
@pytest.mark.multiprocess
def test_trainer_ddp_sharded_ema_equals_unsharded(trainer_runs):
    ranks = _read_ranks(trainer_runs)
    assert all(r["A_layout"] == "ddp_sharded" and r["B_layout"] == "replicated" for r in ranks)
    sharded, unsharded = trainer_runs / "A" / "ema", trainer_runs / "B" / "ema"
    assert _max_diff(_safetensors(sharded), _safetensors(unsharded)) == 0.0
    for step in (2, 4):
        a, b = trainer_runs / "A" / f"checkpoint-{step}" / "ema", trainer_runs / "B" / f"checkpoint-{step}" / "ema"
        assert _max_diff(_safetensors(a), _safetensors(b)) == 0.0
        assert not (a / "shards").exists() and not (b / "shards").exists()  # one copy, whatever the sharding
    # The Trainer's evaluations of the EMA (swapped in on every rank) see the same weights with and without sharding.
    for r in ranks:
        assert len(r["A_eval"]) == 2 and r["A_eval"] == r["B_eval"]
        assert all(raw != ema for raw, ema in r["A_eval"])
    # Per-rank EMA memory: half of the unsharded EMA, and the halves add up to it.
    full = ranks[0]["B_ema_bytes"]
    assert all(0.45 * full <= r["A_ema_bytes"] <= 0.55 * full for r in ranks)
    assert sum(r["A_ema_bytes"] for r in ranks) == full


@pytest.mark.multiprocess
def test_trainer_ddp_resume_matches_uninterrupted(trainer_runs):
    ranks = _read_ranks(trainer_runs)
    assert all(r["C_step"] == 4 for r in ranks)
    assert _max_diff(_safetensors(trainer_runs / "C" / "ema"), _safetensors(trainer_runs / "A" / "ema")) < 1e-6
    # Each rank saved its own oscillation state in checkpoint-2 and got it back: steps 3-4 log the same values.
    saved = sorted(p.name for p in (trainer_runs / "A" / "checkpoint-2" / "ema_stability").iterdir())
    assert saved == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    for r in ranks:
        assert set(r["A_osc"]) == {"1", "2", "3", "4"} and r["A_osc"]["4"][1] > 0
        for step in ("3", "4"):
            assert r["C_osc"][step] == pytest.approx(r["A_osc"][step], abs=1e-7), step

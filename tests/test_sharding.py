"""Sharding-aware EMA: FSDP2, FSDP1 (use_orig_params) and the DDP-sharded EMA, on 2 CPU ranks with gloo.

The multi-process checks run once per module in two `torchrun --nproc_per_node 2` launches (workers in
`tests/dist/`); every number they report is compared here with a single-process run of the same model, seed and
data, computed in this process with a plain (unsharded) `ModelEMA`.
"""

from __future__ import annotations

import json
import os
import subprocess
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
LAYOUT_KIND = {"fsdp2": "fsdp2", "fsdp1": "fsdp1", "ddp": "ddp_sharded", "lora_fsdp2": "fsdp2", "lora_fsdp1": "fsdp1"}


def _read_ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return _safetensors_file(folder / "model.safetensors")


def _saved_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA tensors of an `ema/` folder under their model names (PEFT folders keep them in ema_state)."""
    exact = folder / "ema_state.safetensors"
    return _safetensors_file(exact) if exact.is_file() else _safetensors(folder)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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
    _torchrun("ema_worker.py", str(out), ",".join([*MODES, "zero3sim"]))
    return out


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
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_gathered_ema_matches_single_process(loop_runs, reference, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _read_ranks(loop_runs / mode)
    assert [r["layout"] for r in ranks] == [LAYOUT_KIND[mode]] * 2
    folder = loop_runs / mode / "final" / "ema"
    saved = _saved_ema(folder)
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


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_resume_from_shards_and_from_full_weights(loop_runs, reference, mode):
    ranks = _read_ranks(loop_runs / mode)
    ckpt = loop_runs / mode / "ckpt" / "ema"
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    ]
    for r in ranks:
        assert r["loaded_from_shards"] is True
        assert r["shard_resume_max_diff"] == 0.0
        assert r["reshard_resume_max_diff"] == 0.0
        assert r["resumed_step"] == common.SAVE_STEP
    # The resumed run ends where the uninterrupted one does.
    resumed, final = loop_runs / mode / "resumed" / "ema", loop_runs / mode / "final" / "ema"
    assert _max_diff(_saved_ema(resumed), _saved_ema(final)) < 1e-6
    # Another world size (here 1 process) re-shards from the full weights.
    ema = ModelEMA(common.build(mode, seed=9), decay=common.DECAY)
    meta = load_ema(ema, ckpt)
    assert meta["world_size"] == 2 and meta["layout"] == LAYOUT_KIND[mode]
    assert ema.step == common.SAVE_STEP
    assert _max_diff(ema.full_state_dict(dtype="ema"), reference["ema_at_save"]) < 1e-6


@pytest.mark.multiprocess
def test_fsdp1_without_orig_params_is_a_clear_error(loop_runs):
    info = json.loads((loop_runs / "fsdp1_flat_error.json").read_text())
    assert info["type"] == "ConfigError"
    assert "use_orig_params=True" in info["message"]


# ---------------------------------------------------------------------------------------------------- ZeRO-3
@pytest.mark.multiprocess
def test_zero3_layout_on_simulated_partitions(loop_runs):
    """DeepSpeed cannot run here: this checks the ZeRO-3 layout against DeepSpeed's documented partitioning, built
    by hand in the worker (`run_zero3_simulation`), not against DeepSpeed itself."""
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
        assert r["loaded_from_shards"] is True
        assert r["shard_resume_max_diff"] == 0.0 and r["reshard_resume_max_diff"] == 0.0


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
        assert len(list((a / "shards").iterdir())) == 2 and not (b / "shards").exists()
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


def _zero3_runnable() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available()


@pytest.mark.multiprocess
@pytest.mark.skipif(not _zero3_runnable(), reason="DeepSpeed ZeRO-3 needs `deepspeed` and a CUDA GPU")
def test_zero3_trainer_real_deepspeed(tmp_path):
    """The real thing: Trainer + DeepSpeed ZeRO-3. The EMA in `checkpoint-4/ema` equals the EMA of the raw weights
    the Trainer gathered into `checkpoint-1..4`, and each rank held only its partition of the EMA."""
    from safetensors.torch import load_file

    world = min(2, torch.cuda.device_count())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    proc = subprocess.run(
        [*cmd, str(DIST / "zero3_trainer_worker.py"), str(tmp_path)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"zero3 worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    ema = {k: v.double() for k, v in load_file(str(tmp_path / "initial.safetensors")).items() if v.is_floating_point()}
    for step in range(1, 5):
        raw = load_file(str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
        ema = {k: common.DECAY * v + (1 - common.DECAY) * raw[k].double() for k, v in ema.items()}
    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "ema" / "model.safetensors"))
    for name, value in ema.items():
        assert (saved[name].double() - value).abs().max().item() <= 1e-6, name
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(r["layout"] == "zero3" for r in ranks)
    assert sum(r["ema_bytes"] for r in ranks) == pytest.approx(ranks[0]["full_bytes"], rel=0.02)
    assert max(r["ema_bytes"] for r in ranks) <= ranks[0]["full_bytes"] / world * 1.1

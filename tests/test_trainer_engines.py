"""`EMACallback` under a real `Trainer` with the real engines on 2 CPU ranks (gloo): DeepSpeed ZeRO-3 (plain,
gradient accumulation, LoRA, resume, CPU parameter and optimizer offload) and FSDP2 / FSDP1.

Two `torchrun` launches of `tests/dist/trainer_engine_worker.py` (one per engine, several runs each); every
number they report is checked here against a reference computed in this process: the EMA against one recomputed
from the raw weights the worker gathered from the engine after every optimizer step, the Trainer's `eval_ema_loss`
against the saved EMA loaded into a fresh model and evaluated alone, the resumed EMA against the uninterrupted one.

The FSDP runs rely on accelerate internals (see `tests/dist/accelerate_cpu_workaround.py`);
`test_fsdp_on_cpu_still_needs_the_workaround` fails once they are no longer needed. The first DeepSpeed launch
on a machine JIT-builds DeepSpeed's shared-memory comm op with gcc (cached in `~/.cache/torch_extensions`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hf_ema import ModelEMA, load_ema
from hf_ema.errors import ConfigError

DIST = Path(__file__).resolve().parent / "dist"
sys.path.insert(0, str(DIST))

import common  # noqa: E402
from launch import torchrun  # noqa: E402

ZERO3_RUNS = ["plain", "resume", "accum", "lora", "offload"]
FSDP_RUNS = ["guard", "fsdp2", "fsdp2_resume", "fsdp1", "fsdp1_resume"]
#: The run each resumed run continues (from its `checkpoint-2`).
RESUMES = {"resume": "plain", "fsdp2_resume": "fsdp2", "fsdp1_resume": "fsdp1"}
LAYOUT = {"fsdp2": "fsdp2", "fsdp1": "fsdp1"}
STEPS = 4


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="the `test` extra installs DeepSpeed on Linux only")
    out = tmp_path_factory.mktemp("zero3_trainer")
    # DeepSpeed's CPU accelerator. The first launch on a machine also JIT-builds its shm comm op with gcc: about
    # 30 s on a lightly loaded 2-core machine, 3 min on one at load 13 (measured).
    torchrun(
        "trainer_engine_worker.py", "zero3", str(out), ",".join(ZERO3_RUNS), env={"DS_ACCELERATOR": "cpu"}, timeout=600
    )
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_trainer")
    torchrun("trainer_engine_worker.py", "fsdp", str(out), ",".join(FSDP_RUNS))
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def engine_run(test):
    """The markers of a test that reads the engine runs: 2 ranks, a real Trainer, a minute or more."""
    for mark in (pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.trainer):
        test = mark(test)
    return test


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _mode(run: str) -> str:
    return "lora_" if run == "lora" else "full"


def _recomputed_ema(folder: Path, steps: int) -> dict[str, torch.Tensor]:
    """ema_0 = w_0, ema_k = d * ema_{k-1} + (1 - d) * w_k (constant decay), in float64, from the raw weights the
    worker gathered from the engine before the first and after every optimizer step."""
    ema = {k: v.double() for k, v in _load(folder / "raw-0.safetensors").items()}
    for step in range(1, steps + 1):
        raw = _load(folder / f"raw-{step}.safetensors")
        ema = {k: common.DECAY * v + (1 - common.DECAY) * raw[k].double() for k, v in ema.items()}
    return ema


def _saved_ema_state(run: str, folder: Path) -> dict[str, torch.Tensor]:
    """The EMA saved in an `ema/` folder, read back the way a user resumes: `load_ema` into a fresh single-process
    `ModelEMA` (another world size than the 2 ranks that wrote it)."""
    ema = ModelEMA(common.build(_mode(run), seed=9), decay=common.DECAY)
    meta = load_ema(ema, folder)
    assert meta["world_size"] == 2
    return ema.full_state_dict(dtype="ema")


def _loss_with(run: str, state: dict[str, torch.Tensor]) -> float:
    """The Trainer's eval loss of a fresh model holding `state` (on the other tensors: the seed-0 initial weights,
    which LoRA runs never train): its mean over the 4 eval rows (equal token counts, so equal to the mean of the
    2 ranks' batch losses the Trainer averages)."""
    from trainer_ddp_worker import dataset

    model = common.build(_mode(run), seed=0)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    ids = torch.tensor(dataset(rows=4, seed=8)["input_ids"])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _check_ema_matches_raw_weights(runs: Path, run: str) -> None:
    folder = runs / run
    ranks = _ranks(folder)
    assert all(r["ema_step"] == STEPS and r["global_step"] == STEPS for r in ranks)
    expected = _recomputed_ema(folder, STEPS)
    live = _load(folder / "ema.safetensors")
    assert set(live) <= set(expected), sorted(set(live) - set(expected))
    if run == "lora":
        assert live and all("lora_" in k for k in live)  # the adapter only
    else:
        assert set(expected) - set(live) <= {"lm_head.weight"}  # every trained weight (lm_head is tied)
    expected = {k: expected[k] for k in live}
    assert _max_diff(live, expected) <= 1e-6
    # The EMA saved at steps 2 and 4 is the recomputed one at that step.
    for step in (2, STEPS):
        saved = _saved_ema_state(run, folder / "run" / f"checkpoint-{step}" / "ema")
        at_step = _recomputed_ema(folder, step)
        assert _max_diff({k: saved[k] for k in live}, {k: at_step[k] for k in live}) <= 1e-6


def _check_eval_is_the_saved_ema(runs: Path, run: str) -> None:
    """Each evaluation logged `eval_ema_loss` = the loss of the EMA saved in that step's checkpoint, evaluated alone,
    and `eval_loss` = the loss of the raw weights of that step."""
    folder = runs / run
    expected = {}
    for step in (2, STEPS):
        # A resumed run carries the log of the steps before it: those were evaluated by the run it resumes.
        source = runs / RESUMES.get(run, run) if step <= 2 else folder
        saved = _saved_ema_state(run, source / "run" / f"checkpoint-{step}" / "ema")
        expected[step] = (_loss_with(run, _load(source / f"raw-{step}.safetensors")), _loss_with(run, saved))
    for rank in _ranks(folder):
        evals = {int(step): (raw, ema, is_raw) for step, raw, ema, is_raw in rank["evals"]}
        assert sorted(evals) == sorted(expected)
        for step, (raw_loss, ema_loss, is_raw) in evals.items():
            assert is_raw == 0.0
            assert ema_loss == pytest.approx(expected[step][1], abs=1e-5), step
            assert raw_loss == pytest.approx(expected[step][0], abs=1e-5), step
            assert abs(ema_loss - raw_loss) > 1e-3, (step, raw_loss, ema_loss)  # the EMA, not the raw weights


def _check_resume_exact(runs: Path, run: str) -> None:
    folder, source = runs / run, runs / RESUMES[run]
    assert all(r["ema_step"] == STEPS for r in _ranks(folder))
    # The engine resumed exactly (same raw weights after the resumed steps) ...
    assert _max_diff(_load(folder / f"raw-{STEPS}.safetensors"), _load(source / f"raw-{STEPS}.safetensors")) == 0.0
    # ... and so did the EMA, live and saved, bit for bit (fp32 model, fp32 EMA on disk).
    assert _max_diff(_load(folder / "ema.safetensors"), _load(source / "ema.safetensors")) == 0.0
    final = folder / "run" / f"checkpoint-{STEPS}" / "ema"
    assert _max_diff(_saved_ema_state(run, final), _load(source / "ema.safetensors")) == 0.0


def _full_numels(folder: Path) -> list[int]:
    return [v.numel() for v in _load(folder / "ema.safetensors").values()]


# ---------------------------------------------------------------------------------------------------- in-process
def test_zero3_cpu_offloaded_partitions_are_followed_nvme_refused(monkeypatch):
    """ZeRO-3's optimizer marks the partitions it moved into its CPU/GPU flat buffers `"not-nvme"`; only
    `OffloadDeviceEnum.nvme` means swapped out to NVMe. Parameters built like DeepSpeed's, with its own enums."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed", reason="the `test` extra installs DeepSpeed on Linux only")
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from hf_ema.sharding.zero3 import ZeRO3Layout

    def param(location):
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_id, p.ds_numel, p.ds_shape, p.ds_process_group = 0, 6, torch.Size([2, 3]), None
        p.ds_status, p.ds_persist = ZeroParamStatus.NOT_AVAILABLE, False
        p.ds_tensor = torch.arange(6.0)[:3].clone()
        if location is not None:
            p.ds_tensor.final_location = location
        return p

    layout = ZeRO3Layout()
    for location in (None, "not-nvme", OffloadDeviceEnum.cpu, OffloadDeviceEnum.none):
        p = param(location)
        view = layout.local("w", p)
        assert view.data_ptr() == p.ds_tensor.data_ptr() and view.numel() == 3
    with pytest.raises(ConfigError, match="NVMe.*'w'"):
        layout.local("w", param(OffloadDeviceEnum.nvme))


# ---------------------------------------------------------------------------------------------------- ZeRO-3
@engine_run
@pytest.mark.parametrize("run", ["plain", "accum", "lora", "offload"])
def test_zero3_ema_matches_raw_weights(zero3_runs, run):
    assert all(r["layout"] == "zero3" and r["world_size"] == 2 for r in _ranks(zero3_runs / run))
    _check_ema_matches_raw_weights(zero3_runs, run)


@engine_run
@pytest.mark.parametrize("run", ["plain", "resume", "accum", "lora", "offload"])
def test_zero3_eval_ema_is_the_saved_ema(zero3_runs, run):
    _check_eval_is_the_saved_ema(zero3_runs, run)


@engine_run
def test_zero3_resume_is_exact(zero3_runs):
    _check_resume_exact(zero3_runs, "resume")


@engine_run
@pytest.mark.parametrize("run", ["plain", "lora", "offload"])
def test_zero3_each_rank_holds_half_the_ema(zero3_runs, run):
    numels = _full_numels(zero3_runs / run)
    # ZeRO-3 pads each parameter to a multiple of the 2 ranks and each rank holds one half of it.
    half = sum(math.ceil(n / 2) for n in numels) * 4
    per_rank = [r["ema_bytes"] for r in _ranks(zero3_runs / run)]
    assert per_rank == [half, half]
    assert abs(half / (sum(numels) * 4) - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------------- FSDP
@engine_run
def test_fsdp_on_cpu_still_needs_the_workaround(fsdp_runs):
    """Guard: left alone, accelerate drops the FSDP plugin on CPU ranks and would train plain DDP. When this fails,
    accelerate keeps FSDP on CPU by itself: delete `force_fsdp_on_cpu()` in tests/dist/accelerate_cpu_workaround.py."""
    for rank in _ranks(fsdp_runs / "guard"):
        for version in ("fsdp2", "fsdp1"):
            assert rank[version] == {
                "is_fsdp_enabled": False,
                "distributed_type": "MULTI_CPU",
                "has_fsdp_plugin": False,
            }


@engine_run
@pytest.mark.parametrize("run", ["fsdp2", "fsdp1"])
def test_fsdp_ema_matches_raw_weights(fsdp_runs, run):
    assert all(r["layout"] == LAYOUT[run] and r["world_size"] == 2 for r in _ranks(fsdp_runs / run))
    _check_ema_matches_raw_weights(fsdp_runs, run)


@engine_run
@pytest.mark.parametrize("run", ["fsdp2", "fsdp1", "fsdp2_resume", "fsdp1_resume"])
def test_fsdp_eval_ema_is_the_saved_ema(fsdp_runs, run):
    _check_eval_is_the_saved_ema(fsdp_runs, run)


@engine_run
@pytest.mark.parametrize("run", ["fsdp2_resume", "fsdp1_resume"])
def test_fsdp_resume_is_exact(fsdp_runs, run):
    _check_resume_exact(fsdp_runs, run)


@engine_run
@pytest.mark.parametrize("run", ["fsdp2", "fsdp1"])
def test_fsdp_each_rank_holds_half_the_ema(fsdp_runs, run):
    full = sum(_full_numels(fsdp_runs / run)) * 4
    per_rank = [r["ema_bytes"] for r in _ranks(fsdp_runs / run)]
    assert sum(per_rank) == full  # no padding, no tensor held twice
    assert all(abs(b / full - 0.5) < 0.01 for b in per_rank), (per_rank, full)

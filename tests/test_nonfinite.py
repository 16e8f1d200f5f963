"""Non-finite weights never enter the EMA.

NaN and inf are injected into single steps of a custom loop (`ModelEMA`, every update path: native kernel with the
fused check, eager kernels with a check pass, offloaded inline and in the background thread, before `start_step`)
and of a real `Trainer` run (`EMACallback`), and, on two ranks, into one rank's shard only. Every EMA is compared
with an EMA recomputed here in float64 from the recorded weights of the finite steps.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from _ema_reference import assert_restored
from _trainer_args import cpu_args
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_ema import (
    ConfigError,
    ConfigTypeError,
    EMACallback,
    EMAConfig,
    ModelEMA,
    NonFiniteWeightsError,
    load_ema,
    read_ema_state,
    save_ema,
)
from hf_ema.engine import kernels as K
from hf_ema.engine import native as N
from hf_ema.engine.kernels import MAX_UNDO_WEIGHT, LerpKernel, all_finite, first_nonfinite

DIST = Path(__file__).resolve().parent / "dist"
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
native_available = pytest.mark.skipif(N.compiler() is None, reason="no C compiler for the native kernel")


# ---------------------------------------------------------------------------------------------------- helpers
def kernel_group(live_dtype: torch.dtype, ema_dtype: torch.dtype = torch.float32, seed: int = 0):
    """Tensors of several 64K-element work items of the native kernel, and odd small ones."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 500), (5,), (70, 300), (3, 4, 5)]
    live = [torch.randn(s, generator=g).to(live_dtype) for s in shapes]
    ema = [torch.randn(s, generator=g).to(ema_dtype) for s in shapes]
    return ema, live


KERNEL_CASES = [
    pytest.param("native", torch.bfloat16, torch.float32, marks=native_available, id="native-bf16"),
    pytest.param("native", torch.float16, torch.float32, marks=native_available, id="native-fp16"),
    pytest.param("native", torch.float32, torch.float32, marks=native_available, id="native-fp32"),
    pytest.param("foreach", torch.float32, torch.float32, id="foreach-fp32"),
    pytest.param("foreach", torch.float64, torch.float64, id="foreach-fp64"),
    pytest.param("chunked", torch.bfloat16, torch.float32, id="chunked-bf16"),
]
# (tensor, flat index, value): the first element (nothing folded before it), the middle of a small tensor, and the
# last element of the group (every other work item may be folded in before the check meets it).
POSITIONS = [(0, 0, "nan"), (1, 2, "inf"), (3, 59, "-inf"), (2, 20999, "nan"), (2, 20999, "-inf")]


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("position", POSITIONS, ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}")
@pytest.mark.parametrize(("backend", "live_dtype", "ema_dtype"), KERNEL_CASES)
def test_checked_update_leaves_the_ema(backend, live_dtype, ema_dtype, position):
    ema, live = kernel_group(live_dtype, ema_dtype)
    before = [e.clone() for e in ema]
    kernel = LerpKernel(ema, live, backend=backend, check_finite=True)
    assert kernel.backend == backend and kernel.fused_check == (backend == "native")
    index, flat, bad = position
    live[index].view(-1)[flat] = BAD[bad]
    assert first_nonfinite(live) == index
    assert not all_finite(live) and not kernel.all_finite()
    for weight in (0.01, MAX_UNDO_WEIGHT, 0.5):  # fused and undone; check pass first
        for e, b in zip(ema, before):
            e.copy_(b)
        assert kernel.fold_checked(weight) is False
        for e, b, w in zip(ema, before, live):
            if backend == "native" and weight <= MAX_UNDO_WEIGHT:
                assert_restored(e, b, w, weight)  # blocks folded before the check met the value are undone
            else:
                assert torch.equal(e, b)  # nothing written
    # Finite again: the same kernel folds the formula in.
    for e, b in zip(ema, before):
        e.copy_(b)
    live[index].view(-1)[flat] = 0.25
    assert kernel.all_finite() and kernel.fold_checked(0.01)
    for e, b, w in zip(ema, before, live):
        want = 0.99 * b.double() + 0.01 * w.double()
        torch.testing.assert_close(e.double(), want, rtol=1e-6, atol=1e-6)


@native_available
@pytest.mark.parametrize("live_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_undo_restores_the_ema(live_dtype):
    ema, live = kernel_group(live_dtype, seed=1)
    before = [e.clone() for e in ema]
    kernel = LerpKernel(ema, live, backend="native", check_finite=True)
    assert kernel.fold_checked(0.05)
    assert not all(torch.equal(e, b) for e, b in zip(ema, before))
    kernel.undo(0.05)  # another group or rank said skip
    for e, b, w in zip(ema, before, live):
        assert_restored(e, b, w, 0.05)
    changed = sum(int((e != b).sum()) for e, b in zip(ema, before))
    assert changed < 0.1 * sum(e.numel() for e in ema)  # most elements bit for bit


def test_all_finite_has_no_false_alarm_on_huge_values():
    # 2-norms overflow (fp32 at ~1.8e19 per element, fp16 at 65504 in total): the exact pass decides.
    assert all_finite([torch.full((10,), 3e38), torch.full((4096,), 60000.0, dtype=torch.float16)])
    assert not all_finite([torch.full((10,), 3e38), torch.tensor([1.0, math.inf])])
    assert first_nonfinite([torch.zeros(3), torch.arange(3), torch.tensor([math.nan])]) == 2


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_checked_update_without_native_kernel(monkeypatch, caplog, live_dtype):
    # A fresh process state with no C compiler: the first checked update warns, falls back, and still checks.
    monkeypatch.setattr(N, "_library", None)
    monkeypatch.setattr(N, "_error", None)
    monkeypatch.setattr(N, "compiler", lambda: None)
    monkeypatch.setattr(K, "compile_available", lambda device: False)
    ema, live = kernel_group(live_dtype)
    before = [e.clone() for e in ema]
    kernel = LerpKernel(ema, live, backend="native", check_finite=True)
    live[2].view(-1)[-1] = math.nan
    with caplog.at_level(logging.WARNING, logger="hf_ema.engine.kernels"):
        assert kernel.fold_checked(0.01) is False
    assert kernel.backend == ("foreach" if live_dtype == torch.float32 else "chunked")
    assert "native EMA kernel is unavailable" in caplog.text
    assert all(torch.equal(e, b) for e, b in zip(ema, before))
    live[2].view(-1)[-1] = 0.0
    assert kernel.fold_checked(0.01)
    for e, b, w in zip(ema, before, live):
        torch.testing.assert_close(e.double(), 0.99 * b.double() + 0.01 * w.double(), rtol=1e-6, atol=1e-6)


@native_available
def test_check_picks_the_fused_kernel_for_fp32(monkeypatch):
    ema, live = kernel_group(torch.float32)
    assert LerpKernel(ema, live, check_finite=True).backend == "native"
    assert LerpKernel(ema, live).backend == "foreach"
    monkeypatch.setenv(K.COMPILE_ENV, "never")  # nothing built at run time: the eager kernel and a check pass
    assert LerpKernel(ema, live, check_finite=True).backend == "foreach"


# ---------------------------------------------------------------------------------------------------- config
def test_config_field():
    assert EMAConfig().on_nonfinite == "skip"
    with pytest.raises(ConfigError, match=r"`on_nonfinite` must be one of \('skip', 'raise', 'ignore'\), got 'warn'"):
        EMAConfig(on_nonfinite="warn")
    with pytest.raises(ConfigTypeError, match="`on_nonfinite` must be one of .* got True of type bool"):
        EMAConfig(on_nonfinite=True)
    assert EMAConfig.from_dict(EMAConfig(on_nonfinite="raise").to_dict()).on_nonfinite == "raise"
    assert EMAConfig.from_dict({"decay": 0.9}).on_nonfinite == "skip"  # configs saved before the field


# ---------------------------------------------------------------------------------------------------- ModelEMA loop
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # 160K elements in the middle layer: several work items of the native kernel.
        self.a = nn.Linear(64, 400)
        self.b = nn.Linear(400, 400)
        self.c = nn.Linear(400, 8)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def loop(model, ema, steps, inject, seed=0, restore_after=None):
    """`steps` perturbations of the weights (a stand-in for optimizer steps), each followed by `ema.update()`.

    At the steps in `inject` (`{step: (tensor name, flat index, value)}`) one element is poisoned before the update
    and restored after it. Returns the float64 weights of every finite step and `update()`'s return values.
    """
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    g = torch.Generator().manual_seed(seed)
    records, returned = {}, {}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for t in tensors.values():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.05)
            model.count += 1
        poisoned = None
        if step in inject:
            name, flat, value = inject[step]
            view = tensors[name].data.view(-1)
            poisoned = (view, flat, view[flat].clone())
            view[flat] = value
        else:
            records[step] = {n: t.detach().double().clone() for n, t in tensors.items()}
        returned[step] = ema.update()
        if poisoned is not None:
            view, flat, saved = poisoned
            view[flat] = saved  # the background update folds a snapshot: restoring now is safe
        if restore_after is not None:
            restore_after(step)
    return records, returned


def reference(initial, records, steps, decay, update_every=1, start_step=0):
    """The EMA of the finite steps from the formula, in float64: a copy up to `start_step`, then
    `ema = beta * ema + (1 - beta) * w` with `beta = decay ** update_every` every `update_every` steps."""
    ref = dict(initial)
    for step in range(1, steps + 1):
        if step not in records:
            continue  # skipped: the EMA stays
        if step <= start_step:
            ref = dict(records[step])
            continue
        if (step - start_step) % update_every:
            continue
        beta = decay**update_every
        ref = {n: beta * ref[n] + (1 - beta) * records[step][n] for n in ref}
    return ref


MODES = {
    "on_device": {},
    "offloaded": {"device": "cpu", "async_update": False},
    "background": {"device": "cpu", "async_update": True},
}
# decay 0.95: the fused check (weight 0.05 <= MAX_UNDO_WEIGHT); decay 0.5: the check pass first (weight 0.5);
# update_every 2: weight 1 - 0.95**2; start_step 4: the first injection hits a copy of the weights.
SCHEDULES = {
    "fused": ({"decay": 0.95}, {3: ("b.weight", 159_999, math.nan), 7: ("c.bias", 7, math.inf)}),
    "check_first": ({"decay": 0.5}, {3: ("b.weight", 159_999, math.nan), 7: ("a.weight", 0, -math.inf)}),
    "update_every": (
        {"decay": 0.95, "update_every": 2},
        {4: ("scale", 3, math.nan), 8: ("b.weight", 123_456, math.inf)},
    ),
    "start_step": ({"decay": 0.95, "start_step": 4}, {2: ("b.bias", 0, math.nan), 7: ("b.weight", 159_999, math.nan)}),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_ema_skips_nonfinite_steps(dtype, mode, schedule, caplog):
    cfg_kwargs, inject = SCHEDULES[schedule]
    model = Net().to(dtype)
    initial = {n: t.detach().double().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    # No coalescing (tests/test_coalescing.py has it): every update waits for the fold before it, as the reference.
    strict = {"max_update_interval": cfg_kwargs.get("update_every", 1)} if mode == "background" else {}
    ema = ModelEMA(model, **cfg_kwargs, **MODES[mode], **strict)
    with caplog.at_level(logging.WARNING, logger="hf_ema.model_ema"):
        records, returned = loop(model, ema, steps=9, inject=inject)
        ema.wait()
    ref = reference(initial, records, 9, **cfg_kwargs)
    state = ema.state_dict()
    for name, want in ref.items():
        got = state["tensors"][name]
        assert bool(torch.isfinite(got).all()), name
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6, msg=name)
    assert ema.num_skipped == state["num_skipped"] == 2 and ema.last_skipped_step == max(inject)
    k = cfg_kwargs.get("update_every", 1)
    start = cfg_kwargs.get("start_step", 0)
    expected_updates = sum(1 for s in range(start + 1, 10) if (s - start) % k == 0 and s not in inject)
    assert ema.num_updates == expected_updates
    if mode != "background":  # a background update reports its skip when it finishes
        assert [s for s, changed in returned.items() if not changed and s in inject] == sorted(inject)
    # One warning (rate-limited), naming the step and the tensor.
    warnings = [r.getMessage() for r in caplog.records if "NaN or inf" in r.getMessage()]
    first_step = min(inject)
    assert len(warnings) == 1 and f"at step {first_step} " in warnings[0], warnings
    assert repr(inject[first_step][0]) in warnings[0]
    ema.close()


@pytest.mark.parametrize("mode", ["on_device", "background"])
def test_raise_names_step_and_tensor(mode):
    model = Net()
    ema = ModelEMA(model, decay=0.95, on_nonfinite="raise", **MODES[mode])
    loop(model, ema, steps=2, inject={})
    ema.wait()
    before = {n: t.clone() for n, t in ema.state_dict()["tensors"].items()}
    with pytest.raises(NonFiniteWeightsError, match=r"at step 3 \(first non-finite tensor: 'b.weight'\)") as info:
        loop(model, ema, steps=1, inject={1: ("b.weight", 5, math.inf)}, seed=1, restore_after=lambda s: ema.wait())
    assert isinstance(info.value, FloatingPointError)
    after = ema.state_dict()["tensors"]
    live = dict(zip(ema.names, ema.live_tensors))
    for name in ema.names:  # as before the update (the native kernel undid the blocks it folded before the inf)
        assert_restored(after[name], before[name], live[name], 0.05)
    assert ema.num_skipped == 1 and ema.num_updates == 2


def test_ignore_lets_nan_in():
    # What the check prevents: with it off, one NaN poisons the EMA for good.
    model = Net()
    ema = ModelEMA(model, decay=0.95, on_nonfinite="ignore")
    loop(model, ema, steps=4, inject={2: ("b.weight", 0, math.nan)})
    assert bool(torch.isnan(ema.state_dict()["tensors"]["b.weight"]).any())
    assert ema.num_skipped == 0


def test_persistent_nan_keeps_the_last_finite_average():
    # A run that blew up: the weights stay NaN. Every update is skipped, the EMA is the one before, bit for bit.
    model = Net()
    ema = ModelEMA(model, decay=0.95)
    loop(model, ema, steps=3, inject={})
    before = {n: t.clone() for n, t in ema.state_dict()["tensors"].items()}
    with torch.no_grad():
        model.b.weight.view(-1)[-1] = math.nan
    for _ in range(5):
        assert ema.update() is False
    after = ema.state_dict()["tensors"]
    assert ema.num_skipped == 5
    live = dict(zip(ema.names, ema.live_tensors))
    for name in ema.names:  # the first skip undid the blocks folded in before the NaN; the next wrote nothing
        assert_restored(after[name], before[name], live[name], 0.05)
    ema.reset()  # a copy of NaN weights is skipped too
    assert ema.num_skipped == 6 and bool(torch.isfinite(ema.state_dict()["tensors"]["b.weight"]).all())


def test_num_skipped_is_saved_and_restored(tmp_path):
    model = Net()
    ema = ModelEMA(model, decay=0.95)
    loop(model, ema, steps=4, inject={3: ("a.bias", 1, math.nan)})
    save_ema(ema, tmp_path / "ema")
    meta = read_ema_state(tmp_path / "ema")
    assert meta["num_skipped"] == 1 and meta["num_updates"] == 3
    assert json.loads((tmp_path / "ema" / "ema_config.json").read_text())["on_nonfinite"] == "skip"
    resumed = ModelEMA(Net(), decay=0.95)
    load_ema(resumed, tmp_path / "ema")
    assert resumed.num_skipped == 1 and resumed.num_updates == 3


# ---------------------------------------------------------------------------------------------------- Trainer
class InjectAndRecord(TrainerCallback):
    """After the optimizer step of each step in `inject` one weight element becomes NaN / inf (before the EMA
    update at `on_step_end`), and it is restored before the next step; the weights of every other step are
    recorded in float64."""

    def __init__(self, inject: dict[int, tuple[str, int, float]]):
        self.inject = inject
        self.initial: dict[str, torch.Tensor] = {}
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self._saved = None
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1  # global_step is incremented after this event
        params = dict(self.model.named_parameters())
        if step in self.inject:
            name, flat, value = self.inject[step]
            view = params[name].data.view(-1)
            self._saved = (view, flat, view[flat].clone())
            view[flat] = value
        else:
            self.records[step] = {n: p.detach().double().clone() for n, p in params.items()}

    def on_step_begin(self, args, state, control, **kwargs):
        if self._saved is not None:
            view, flat, value = self._saved
            view[flat] = value
            self._saved = None


@pytest.mark.parametrize("ema_kwargs", [{}, {"device": "cpu", "async_update": True}], ids=["on_device", "background"])
@pytest.mark.trainer
def test_trainer_skips_nonfinite_steps(tmp_path, tiny_model, lm_data, caplog, ema_kwargs):
    inject = {3: ("model.layers.1.mlp.down_proj.weight", 5, math.nan), 6: ("model.norm.weight", 0, math.inf)}
    recorder = InjectAndRecord(inject)
    callback = EMACallback(decay=0.9, eval_ema=False, **ema_kwargs)
    args = cpu_args(
        tmp_path, max_steps=8, per_device_train_batch_size=4, learning_rate=5e-3, save_steps=8, logging_steps=2
    )
    trainer = Trainer(model=tiny_model, args=args, train_dataset=lm_data[0], callbacks=[callback, recorder])
    with caplog.at_level(logging.WARNING, logger="hf_ema.model_ema"):
        trainer.train()
    ref = reference(recorder.initial, recorder.records, 8, decay=0.9)
    ema = callback.ema
    state = ema.state_dict()["tensors"]
    for name in ema.names:
        assert bool(torch.isfinite(state[name]).all()), name
        torch.testing.assert_close(state[name].double(), ref[name], rtol=2e-6, atol=2e-6, msg=name)
    assert ema.num_skipped == 2
    # Logged with the Trainer's metrics, and once as a warning naming the first step and tensor.
    logged = [e["ema_skipped_updates"] for e in trainer.state.log_history if "ema_skipped_updates" in e]
    assert logged[-1] == 2 and logged == sorted(logged)
    warnings = [r.getMessage() for r in caplog.records if "NaN or inf" in r.getMessage()]
    assert warnings and "at step 3 " in warnings[0] and "down_proj.weight" in warnings[0]
    # The saved EMA is the finite one, and the skips are in its state file.
    assert read_ema_state(tmp_path / "ema")["num_skipped"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "ema").glob("*.safetensors"))))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------------- two ranks
@pytest.mark.multiprocess
def test_every_rank_skips_what_one_rank_sees(tmp_path):
    sys.path.insert(0, str(DIST))
    from launch import torchrun

    modes = ["ddp", "ddp_background", "fsdp2"]
    if importlib.util.find_spec("triton") is not None:
        modes += ["ddp_triton", "fsdp2_triton"]  # the skip decided on the device, agreed by a MAX all-reduce
    torchrun("nonfinite_worker.py", str(tmp_path), ",".join(modes))
    from safetensors.torch import load_file

    for mode in modes:
        folder = tmp_path / mode
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
        inject = {int(k): v for k, v in ranks[0]["inject"].items()}
        # The poisoned element is in rank 1's shard only, yet both ranks skipped the same steps.
        assert [r["saw_nonfinite_locally"] for r in ranks] == [False, True], mode
        for r in ranks:
            assert r["num_skipped"] == len(inject) and r["last_skipped_step"] == max(inject), (mode, r)
            if mode in ("ddp", "fsdp2"):  # known at once (elsewhere: when the outcome arrives)
                assert [int(s) for s, changed in r["returned"].items() if not changed] == sorted(inject), mode
        weights = load_file(str(folder / "weights.safetensors"))
        steps = ranks[0]["steps"]
        initial = {k.split("/", 1)[1]: v.double() for k, v in weights.items() if k.startswith("0/")}
        records = {
            s: {k.split("/", 1)[1]: v.double() for k, v in weights.items() if k.startswith(f"{s}/")}
            for s in range(1, steps + 1)
            if s not in inject
        }
        ref = reference(initial, records, steps, decay=ranks[0]["decay"])
        got = load_file(str(folder / "ema.safetensors"))
        assert set(got) == set(ref), mode
        for name, want in ref.items():
            assert bool(torch.isfinite(got[name]).all()), (mode, name)
            torch.testing.assert_close(got[name].double(), want, rtol=2e-6, atol=2e-6, msg=f"{mode} {name}")

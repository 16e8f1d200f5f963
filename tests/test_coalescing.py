"""An offloaded EMA whose background fold is slow never stalls training: updates that come while it runs are
coalesced into the next one, which folds the newest weights with `beta ** k` for the `k` steps it covers, up to
`max_update_interval` (then it waits). Resume after coalesced updates is bit-exact.

The fold is made artificially slow by a gate: each background fold waits until the test opens it, so which updates
coalesce is decided by the test, not by timing.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from _trainer_args import cpu_args
from torch import nn
from transformers import Trainer

from hf_ema import EMACallback, ModelEMA, load_ema, read_ema_state, save_ema
from hf_ema.engine.offload import OffloadedUpdate

DECAY = 0.9
DIST = Path(__file__).resolve().parent / "dist"


class Gate:
    """Holds every background fold of `ema` until `release()`; `done` is set when a released fold has finished."""

    def __init__(self, ema: ModelEMA) -> None:
        offload = ema._updater.offload
        assert isinstance(offload, OffloadedUpdate) and offload.async_update
        self.opened = threading.Semaphore(0)
        self.finished = threading.Semaphore(0)
        fold = offload._fold

        def gated(*args):
            self.opened.acquire()
            try:
                return fold(*args)
            finally:
                self.finished.release()

        offload._fold = gated

    def release(self) -> None:
        """Let the fold in flight run, and wait until it has written the EMA."""
        self.opened.release()
        assert self.finished.acquire(timeout=30)

    @contextlib.contextmanager
    def passing(self):
        """Let through the one fold that the read inside makes itself (of the steps coalesced before it)."""
        self.opened.release()
        yield
        assert self.finished.acquire(timeout=30)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 4)).to(torch.bfloat16)


def perturb(model, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


def weights(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def update_blocks(ema, gate) -> bool:
    """Run `ema.update()` in a thread: whether it was still waiting after 0.3 s (then open the gate for it)."""
    worker = threading.Thread(target=ema.update)
    worker.start()
    worker.join(0.3)
    blocked = worker.is_alive()
    if blocked:
        gate.release()
        worker.join(30)
    return blocked


def test_coalesced_updates_equal_the_beta_k_reference():
    model = make_model()
    ema = ModelEMA(model, decay=DECAY, device="cpu", async_update=True, max_update_interval=4)
    gate = Gate(ema)
    ref = weights(model)
    folded = []  # (step, interval) of every fold, as the test expects them

    def fold(step, k):
        nonlocal ref
        beta = DECAY**k
        ref = {n: beta * ref[n] + (1 - beta) * w for n, w in weights(model).items()}
        folded.append((step, k))

    returned = {}
    for step in range(1, 4):  # 1 folds (held at the gate); 2 and 3 come while it runs: coalesced
        perturb(model, step)
        returned[step] = ema.update()
        if step == 1:
            fold(1, 1)
    gate.release()
    perturb(model, 4)
    returned[4] = ema.update()  # the fold is free: the newest weights for steps 2-4
    fold(4, 3)
    for step in (5, 6, 7):
        perturb(model, step)
        returned[step] = ema.update()  # coalesced: 1, 2, 3 steps pending
    perturb(model, 8)
    assert update_blocks(ema, gate)  # 4 steps would reach max_update_interval: this one waits for the fold
    fold(8, 4)
    gate.release()
    perturb(model, 9)
    returned[9] = ema.update()
    fold(9, 1)
    gate.release()
    state = ema.state_dict()
    assert returned == {1: True, 2: False, 3: False, 4: True, 5: False, 6: False, 7: False, 9: True}
    assert ema.update_intervals == {1: 2, 3: 1, 4: 1} and ema.last_interval == 1
    assert ema.num_updates == 4 and state["update_intervals"] == {"1": 2, "3": 1, "4": 1}
    for name, want in ref.items():
        torch.testing.assert_close(state["tensors"][name].double(), want, rtol=2e-6, atol=2e-6, msg=name)
    ema.close()


def test_coalescing_never_waits_before_the_bound():
    model = make_model()
    ema = ModelEMA(model, decay=DECAY, device="cpu", async_update=True, max_update_interval=16)
    gate = Gate(ema)
    perturb(model, 1)
    ema.update()  # held at the gate from now on
    for step in range(2, 17):  # 15 updates while the fold is held: none waits (they would hang here)
        perturb(model, step)
        assert not update_blocks(ema, gate), step
    perturb(model, 17)
    assert update_blocks(ema, gate)  # the 16th pending step is the bound: it waits
    gate.release()
    assert ema.update_intervals == {1: 1, 16: 1}
    ema.close()


def test_wait_folds_the_coalesced_steps():
    # A read (save, evaluation) folds the newest weights for the steps coalesced since the last fold.
    model = make_model()
    ema = ModelEMA(model, decay=DECAY, device="cpu", async_update=True)
    gate = Gate(ema)
    ref = weights(model)
    perturb(model, 1)
    ema.update()
    ref = {n: DECAY * ref[n] + (1 - DECAY) * w for n, w in weights(model).items()}
    for step in (2, 3):
        perturb(model, step)
        assert ema.update() is False
    gate.release()
    with gate.passing():
        got = ema.state_dict()["tensors"]
    beta = DECAY**2
    ref = {n: beta * ref[n] + (1 - beta) * w for n, w in weights(model).items()}
    for name, want in ref.items():
        torch.testing.assert_close(got[name].double(), want, rtol=2e-6, atol=2e-6, msg=name)
    assert ema.update_intervals == {1: 1, 2: 1}
    ema.close()


def run_steps(model, ema, gate, steps):
    """The same coalescing pattern in every run: the first update of each pair folds (released before the next
    pair), the second comes while that fold is held and is coalesced."""
    for step in steps:
        perturb(model, step)
        ema.update()
        if step % 2 == 0:
            gate.release()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_resume_after_coalesced_updates_is_bit_exact(tmp_path, dtype):
    model = make_model().to(dtype)
    ema = ModelEMA(model, decay=DECAY, device="cpu", async_update=True)
    gate = Gate(ema)
    run_steps(model, ema, gate, range(1, 7))
    with gate.passing():  # step 6 was coalesced: the save folds it in first
        save_ema(ema, tmp_path / "ema")
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    run_steps(model, ema, gate, range(7, 13))
    with gate.passing():
        uninterrupted = ema.state_dict()

    resumed_model = make_model().to(dtype)
    resumed_model.load_state_dict(at_save)
    resumed = ModelEMA(resumed_model, decay=DECAY, device="cpu", async_update=True)
    load_ema(resumed, tmp_path / "ema")
    gate = Gate(resumed)
    run_steps(resumed_model, resumed, gate, range(7, 13))
    with gate.passing():
        after = resumed.state_dict()
    # Steps 1, 3 and 5 folded (intervals 1, 2, 2), 2, 4 and 6 coalesced, step 6 folded by the save (interval 1).
    assert read_ema_state(tmp_path / "ema")["update_intervals"] == {"1": 2, "2": 2}
    for name, tensor in uninterrupted["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name
    for key in ("step", "num_updates", "decay", "update_intervals", "last_interval"):
        assert after[key] == uninterrupted[key], key
    ema.close()
    resumed.close()


@pytest.mark.trainer
def test_trainer_logs_the_coalesced_interval(tmp_path, tiny_model, lm_data):
    callback = EMACallback(decay=DECAY, device="cpu", async_update=True, save_final=False)
    args = cpu_args(tmp_path, max_steps=6, per_device_train_batch_size=4, logging_steps=2, save_strategy="no")
    trainer = Trainer(model=tiny_model, args=args, train_dataset=lm_data[0], callbacks=[callback])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    intervals = callback.ema.update_intervals
    assert len(logged) == 3 and all(entry["ema_update_interval"] in intervals for entry in logged)
    assert callback.ema.num_updates == sum(intervals.values())


@pytest.mark.multiprocess
@pytest.mark.parametrize("on_nonfinite", ["skip", "ignore"])
def test_ranks_coalesce_alike(tmp_path, on_nonfinite):
    # Two DDP ranks, one sharded EMA: only rank 1's fold is slow, yet both ranks fold at the same steps with the same
    # intervals, and the gathered EMA is the beta ** k average of the weights at those steps.
    sys.path.insert(0, str(DIST))
    from launch import torchrun
    from safetensors.torch import load_file

    torchrun("coalescing_worker.py", str(tmp_path), on_nonfinite)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["folds"] == ranks[1]["folds"] and ranks[0]["intervals"] == ranks[1]["intervals"]
    folds = ranks[0]["folds"]
    assert max(k for _, k in folds) > 1  # rank 1's slow fold made both ranks coalesce
    weights = load_file(str(tmp_path / "weights.safetensors"))
    names = {k.split("/", 1)[1] for k in weights if k.startswith("0/")}
    ref = {n: weights[f"0/{n}"].double() for n in names}
    for step, k in folds:
        beta = ranks[0]["decay"] ** k
        ref = {n: beta * ref[n] + (1 - beta) * weights[f"{step}/{n}"].double() for n in names}
    got = load_file(str(tmp_path / "ema.safetensors"))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor.double(), ref[name], rtol=2e-6, atol=2e-6, msg=name)

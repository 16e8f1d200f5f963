"""Offloaded EMA with a background update, the CUDA side-stream ordering and the optimizer guard.

No GPU runs here: the CPU code paths run for real; the side-stream ordering is checked against a recording
stand-in for `torch.cuda` (the only thing mocked, because CUDA cannot run on this machine).
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from _trainer_args import cpu_args
from torch import nn
from transformers import Trainer

from hf_ema import ConfigError, EMACallback, EMAConfig, ModelEMA
from hf_ema.demo.toy import tiny_causal_lm
from hf_ema.engine import kernels as K
from hf_ema.engine.offload import OffloadedUpdate
from hf_ema.engine.streams import SideStream, register_pre_step_guard


def perturb(model, g, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def reference_run(model, ema, steps, decay, seed=0, between=None):
    g = torch.Generator().manual_seed(seed)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(steps):
        perturb(model, g)
        ema.update()
        if between is not None:
            between()
        ref = {n: decay * ref[n] + (1 - decay) * p.detach().double() for n, p in model.named_parameters()}
    return ref


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).to(dtype)


def test_async_update_requires_cpu_device():
    with pytest.raises(ConfigError, match="async_update"):
        EMAConfig(async_update=True)
    with pytest.raises(TypeError, match="cuda_stream"):
        EMAConfig(cuda_stream="yes")
    assert EMAConfig(device="cpu", async_update=True).async_update is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("async_update", [True, False])
def test_offloaded_matches_formula(dtype, async_update):
    model = make_model(dtype)
    # max_update_interval=1: every update waits for the fold before it (no coalescing, see tests/test_coalescing.py).
    ema = ModelEMA(model, decay=0.9, device="cpu", async_update=async_update, max_update_interval=1)
    assert (ema._updater.offload is not None) == async_update
    ref = reference_run(model, ema, steps=6, decay=0.9)
    state = ema.state_dict()["tensors"]
    for name, r in ref.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name].double(), r, rtol=2e-6, atol=2e-6)
    ema.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_equals_on_device_bitwise(dtype):
    # The background fold runs the same kernel on a snapshot of the same weights: identical bits.
    a, b = make_model(dtype), make_model(dtype)
    on_device = ModelEMA(a, decay=0.95)
    offloaded = ModelEMA(b, decay=0.95, device="cpu", async_update=True, max_update_interval=1)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        perturb(a, g1)
        perturb(b, g2)
        on_device.update()
        offloaded.update()
    sa, sb = on_device.state_dict()["tensors"], offloaded.state_dict()["tensors"]
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class SlowKernel:
    """Wraps a real kernel and sleeps first, so the fold is surely still running when the test reads."""

    def __init__(self, kernel, delay):
        self.kernel, self.delay = kernel, delay
        self.threads = []

    def __call__(self, weight):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        self.kernel(weight)


def slow_down(ema, delay=0.3):
    offload = ema._updater.offload
    offload.kernels = [SlowKernel(k, delay) for k in offload.kernels]
    return offload.kernels


@pytest.mark.parametrize("read", ["state_dict", "full_state_dict", "swapped", "copy_to", "update"])
def test_every_read_waits_for_the_inflight_update(read):
    model = make_model()
    ema = ModelEMA(model, decay=0.5, device="cpu", async_update=True)
    slow = slow_down(ema)
    g = torch.Generator().manual_seed(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, g)
    expected = {n: 0.5 * start[n] + 0.5 * p.detach() for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    ema.update()
    # The update returned before the fold: training would continue here.
    assert time.perf_counter() - t0 < 0.25
    assert ema._updater.offload.in_flight
    if read == "state_dict":
        got = ema.state_dict()["tensors"]
    elif read == "full_state_dict":
        got = ema.full_state_dict(dtype="ema")
    elif read == "swapped":
        with ema.swapped() as m:
            got = {n: p.detach().clone() for n, p in m.named_parameters()}
    elif read == "copy_to":
        other = make_model()
        ema.copy_to(other)
        got = dict(other.named_parameters())
    else:
        # The next update waits for the previous one: at most one in flight, no queue.
        perturb(model, g)
        expected = {n: 0.5 * expected[n] + 0.5 * p.detach() for n, p in model.named_parameters()}
        ema.update()
        got = ema.state_dict()["tensors"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value)
    assert not ema._updater.offload.in_flight
    assert all(name.startswith("hf-ema-update") for name in slow[0].threads)


def test_snapshot_is_taken_before_update_returns():
    # The optimizer may change the weights right after `update()`: the in-flight fold must not see that change.
    model = make_model()
    ema = ModelEMA(model, decay=0.5, device="cpu", async_update=True)
    slow_down(ema)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update()
    perturb(model, torch.Generator().manual_seed(3), scale=10.0)  # while the fold sleeps
    got = ema.state_dict()["tensors"]
    for name, value in before.items():
        torch.testing.assert_close(got[name], value)  # 0.5 * w + 0.5 * w


def test_background_error_surfaces_on_next_read(monkeypatch):
    model = make_model()
    ema = ModelEMA(model, decay=0.5, device="cpu", async_update=True)

    def boom(*args):
        raise RuntimeError("fold failed")

    # The checked update (the default on_nonfinite="skip") starts with one of these.
    kernel = ema._updater.offload.kernels[0]
    monkeypatch.setattr(kernel, "all_finite", boom)
    monkeypatch.setattr(kernel, "fold_checked", boom)
    ema.update()
    with pytest.raises(RuntimeError, match="fold failed"):
        ema.state_dict()


def test_offloaded_update_direct_api():
    live = [torch.randn(10, dtype=torch.bfloat16), torch.randn(3, 3, dtype=torch.bfloat16)]
    ema = [t.float() for t in live]
    start = [e.clone() for e in ema]
    up = OffloadedUpdate([(ema, live)], async_update=True)
    assert up.staging[0][0] is not live[0] and not up.staging[0][0].is_pinned()
    up.submit(0.25)
    up.wait()
    for e, s, w in zip(ema, start, live):
        torch.testing.assert_close(e, 0.75 * s + 0.25 * w.float())
    up.copy_now()
    for e, w in zip(ema, live):
        assert torch.equal(e, w.float())
    up.close()
    assert up._executor is None


def test_background_fold_uses_one_thread_for_cpu_weights():
    # The fold shares the cores with training: one intra-op thread in the worker, the rest of the process untouched.
    before = torch.get_num_threads()
    up = OffloadedUpdate([([torch.zeros(8)], [torch.ones(8)])], async_update=True)
    up.submit(0.5)
    up.wait()
    assert up._executor.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before]
    up.close()


@pytest.mark.skipif(not K.compile_available("cpu"), reason="no C++ compiler for inductor")
def test_compiled_kernel_in_the_background_thread():
    # Large offloaded bf16 models get the compiled kernel, compiled on its first call: in the worker thread.
    live = [torch.randn(100, 30, dtype=torch.bfloat16), torch.randn(7, dtype=torch.bfloat16)]
    ema = [t.float() for t in live]
    start = [e.clone() for e in ema]
    up = OffloadedUpdate([(ema, live)], async_update=True, backend="compiled")
    up.submit(0.25)
    up.wait()
    assert up.kernels[0].backend == "compiled"
    for e, s0, w in zip(ema, start, live):
        torch.testing.assert_close(e, 0.75 * s0 + 0.25 * w.float())
    up.close()


def test_cuda_stream_on_cpu_is_a_plain_update():
    model = make_model()
    ema = ModelEMA(model, decay=0.9, cuda_stream=True)
    assert ema._updater.sides == {} and ema._updater._remove_guard is None
    ref = reference_run(model, ema, steps=3, decay=0.9)
    for name, value in ema.state_dict()["tensors"].items():
        torch.testing.assert_close(value.double(), ref[name], rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------- side stream ordering (CUDA stand-in)


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name}.wait({other.name})")

    def synchronize(self):
        self.log.append(f"{self.name}.synchronize")


class FakeCuda:
    """Records the stream calls `SideStream` makes, standing in for `torch.cuda` (no GPU here)."""

    def __init__(self):
        self.log = []
        self.current = FakeStream(self.log, "current")
        self.active = "current"

    def Stream(self, device=None):
        return FakeStream(self.log, "side")

    def current_stream(self, device=None):
        return self.current

    def stream(self, s):
        fake = self

        class Ctx:
            def __enter__(self):
                fake.active = s.name
                fake.log.append(f"enter({s.name})")

            def __exit__(self, *exc):
                fake.active = "current"
                fake.log.append(f"exit({s.name})")

        return Ctx()


def test_side_stream_ordering():
    cuda = FakeCuda()
    side = SideStream(torch.device("cuda", 0), backend=cuda)
    side.before_weights_change()  # nothing queued yet: no wait
    assert cuda.log == []
    with side.launch():
        cuda.log.append(f"update on {cuda.active}")
    assert side.pending
    side.before_weights_change()
    side.before_weights_change()  # once is enough
    with side.launch():
        cuda.log.append(f"update on {cuda.active}")
    side.synchronize()
    assert cuda.log == [
        "side.wait(current)",  # read the weights only after the optimizer wrote them
        "enter(side)",
        "update on side",
        "exit(side)",
        "current.wait(side)",  # the next optimizer step waits for the update
        "side.wait(current)",
        "enter(side)",
        "update on side",
        "exit(side)",
        "current.wait(side)",  # a read waits too, on the host
        "side.synchronize",
    ]
    assert not side.pending


def test_pre_step_guard_runs_before_optimizer_step_and_goes_away():
    calls = []

    class Owner:
        def before_weights_change(self):
            calls.append("guard")

    owner = Owner()
    remove = register_pre_step_guard(owner)
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)

    def record_step(optimizer, args, kwargs):
        calls.append("step")

    later = opt.register_step_pre_hook(record_step)
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["guard", "step"]
    del owner
    gc.collect()
    opt.step()  # the hook removes itself once its owner is gone
    opt.step()
    assert calls == ["guard", "step", "step", "step"]
    later.remove()
    remove()


# ---------------------------------------------------------------------- real Trainer run


def train(tmp_path, tokenizer, train_ds, **ema_kwargs):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    callback = EMACallback(decay=0.8, **ema_kwargs)
    args = cpu_args(
        tmp_path,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[callback]).train()
    return callback.ema.state_dict()["tensors"], callback


@pytest.mark.trainer
def test_trainer_offloaded_equals_on_device(tmp_path, tokenizer, lm_data):
    train_ds, _ = lm_data
    on_device, _ = train(tmp_path / "a", tokenizer, train_ds)
    offloaded, cb = train(tmp_path / "b", tokenizer, train_ds, device="cpu", async_update=True)
    assert cb.ema._updater.offload is not None and cb.ema.num_updates == 5
    assert on_device.keys() == offloaded.keys()
    for name in on_device:
        assert torch.equal(on_device[name], offloaded[name]), name
    cb.ema.close()

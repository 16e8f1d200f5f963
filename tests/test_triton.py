"""The Triton update (`hf_ema.engine.device`), run on the CPU by Triton's interpreter (`TRITON_INTERPRET=1`), against
float64 references; and the proof that `ModelEMA.update()` on that path never reads a device value on the host.

On a GPU the same kernel is compiled; `test_no_sync_on_cuda` runs there under `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from _ema_reference import assert_restored
from torch import nn
from torch.overrides import TorchFunctionMode

from hf_ema import ModelEMA, NonFiniteWeightsError
from hf_ema.engine import device as D
from hf_ema.engine.kernels import MAX_UNDO_WEIGHT

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton: the test extra pins it)")

BLOCK = 64  # small blocks: many blocks per tensor, and the interpreter stays fast
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter on CPU tensors, and the Triton update chosen wherever it can run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(D.KERNEL_ENV, "triton")
    # The interpreter computes with NumPy, which warns about the NaN/inf the tests put into the weights.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    yield
    warnings.resetwarnings()


def group(dtype, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    live = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    ema = [torch.randn(n, generator=g) for n in sizes]
    return ema, live


# Around the block size: 0 and 1 elements, one short of a block, exactly one, one over, several plus a tail.
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 7]


# ---------------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_triton_update_equals_float64_reference(dtype, check):
    ema, live = group(dtype, SIZES)
    ref = [e.double() for e in ema]
    update = D.DeviceUpdate([(ema, live)], [0], check=check, block=BLOCK)
    g = torch.Generator().manual_seed(1)
    for weight in (0.3, 0.01, MAX_UNDO_WEIGHT, 0.5, 1.0):  # 0.5 and 1.0: checked before they are written
        for w in live:
            w.copy_(torch.randn(w.shape, generator=g).to(dtype))
        update.fold(weight, step=1, force_check=weight > MAX_UNDO_WEIGHT)
        w32 = torch.tensor(weight, dtype=torch.float32).double()  # the kernel's weight is fp32
        ref = [(1 - w32) * r + w32 * x.double() for r, x in zip(ref, live)]
    for e, r in zip(ema, ref):
        torch.testing.assert_close(e.double(), r, rtol=2e-6, atol=2e-6)
    assert [o.folded for o in update.wait()] == ([True] * 5 if check else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize(
    "where", [(2, 0), (2, BLOCK - 2), (5, 0), (5, 3 * BLOCK + 4), (6, 6), (1, 0)], ids=lambda w: f"{w[0]}-{w[1]}"
)
def test_triton_skips_nonfinite_and_restores(dtype, value, where):
    # The first and the last element of tensors (first, middle and last tensor of the group, one of 1 element).
    ema, live = group(dtype, SIZES)
    before = [e.clone() for e in ema]
    index, flat = where
    live[index].view(-1)[flat] = BAD[value]
    update = D.DeviceUpdate([(ema, live)], [7], check=True, block=BLOCK)
    for weight in (0.01, MAX_UNDO_WEIGHT, 0.5):  # fused then undone; checked first (nothing written)
        for e, b in zip(ema, before):
            e.copy_(b)
        update.prev.zero_()  # each weight as a first try (not "checked first after a skip")
        update.fold(weight, step=3, force_check=weight > MAX_UNDO_WEIGHT)
        (outcome,) = update.wait()
        assert not outcome.folded and outcome.step == 3 and outcome.bad == (7, index)
        for e, b, w in zip(ema, before, live):
            if weight <= MAX_UNDO_WEIGHT:
                assert_restored(e, b, w, weight)
            else:
                assert torch.equal(e, b)
    # The next update is checked before it is written (the previous one was skipped): still NaN -> nothing written.
    snapshot = [e.clone() for e in ema]
    update.fold(0.01, step=4)
    assert not update.wait()[0].folded and all(torch.equal(e, s) for e, s in zip(ema, snapshot))
    # Finite again: folded, checked first once more, then back to the fused check.
    live[index].view(-1)[flat] = 0.25
    for step in (5, 6):
        snapshot = [e.double() for e in ema]
        update.fold(0.01, step=step)
        assert update.wait()[0].folded
        w32 = torch.tensor(0.01, dtype=torch.float32).double()
        for e, s, x in zip(ema, snapshot, live):
            torch.testing.assert_close(e.double(), (1 - w32) * s + w32 * x.double(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_copy_is_checked_first(dtype):
    ema, live = group(dtype, SIZES)
    before = [e.clone() for e in ema]
    update = D.DeviceUpdate([(ema, live)], [0], check=True, block=BLOCK)
    live[3].view(-1)[-1] = math.nan
    update.copy(step=1)
    assert update.wait()[0].bad == (0, 3) and all(torch.equal(e, b) for e, b in zip(ema, before))
    live[3].view(-1)[-1] = 1.5
    update.copy(step=2)
    assert update.wait()[0].folded and all(torch.equal(e, w.float()) for e, w in zip(ema, live))


def count_launches(monkeypatch):
    launches = []
    kernel = D.TritonGroup.launch

    def counting(self, mode, *args, **kwargs):
        launches.append((mode, len(self._parts)))
        return kernel(self, mode, *args, **kwargs)

    monkeypatch.setattr(D.TritonGroup, "launch", counting)
    return launches


def test_triton_launches_do_not_grow_with_the_number_of_tensors(monkeypatch):
    # Hundreds of tensors in one group: the same launches per update as three tensors, and the result is exact.
    g = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(0, 3 * BLOCK, (300,), generator=g)]
    counts = {}
    for n_tensors in (3, 300):
        ema, live = group(torch.bfloat16, sizes[:n_tensors], seed=n_tensors)
        ref = [(0.95 * e.double() + 0.05 * w.double()) for e, w in zip(ema, live)]
        update = D.DeviceUpdate([(ema, live)], [0], check=True, block=BLOCK)
        launches = count_launches(monkeypatch)
        update.fold(0.05, step=1)
        counts[n_tensors] = sum(parts for _, parts in launches)
        assert update.wait()[0].folded
        for e, r in zip(ema, ref):
            torch.testing.assert_close(e.double(), r, rtol=2e-6, atol=2e-6)
        monkeypatch.undo()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv(D.KERNEL_ENV, "triton")
    assert counts[3] == counts[300] == 3  # CHECK (idle), UPDATE, UNDO (idle): one each


def test_triton_misaligned_tensors_take_the_second_table():
    # Views at odd element offsets: not 16-byte aligned, so no alignment hint (a wrong hint would corrupt them).
    base_ema, base_live = torch.randn(1000), torch.randn(1000).to(torch.bfloat16)
    ema = [base_ema[1:200], base_ema[200:264], base_ema[301:302]]
    live = [base_live[3:202], base_live[504:568], base_live[999:]]  # the second pair is 16-byte aligned
    ref = [0.9 * e.double() + 0.1 * w.double() for e, w in zip(ema, live)]
    untouched = torch.cat([base_ema[:1], base_ema[264:301], base_ema[302:]]).clone()
    update = D.DeviceUpdate([(ema, live)], [0], check=True, block=BLOCK)
    assert sorted(p.aligned for p in update.parts[0]._parts) == [False, True]
    update.fold(0.1, step=1)
    for e, r in zip(ema, ref):
        torch.testing.assert_close(e.double(), r, rtol=2e-6, atol=2e-6)
    assert torch.equal(torch.cat([base_ema[:1], base_ema[264:301], base_ema[302:]]), untouched)
    live[1][5] = math.inf
    update.fold(0.1, step=2)
    assert update.wait()[-1].bad == (0, 1)


def test_triton_follows_storage_that_moved():
    ema, live = group(torch.float32, [100, 10])
    update = D.DeviceUpdate([(ema, live)], [0], check=False, block=BLOCK)
    update.fold(0.5, step=1)
    live[0].set_(torch.full((100,), 2.0))  # the parameter's storage was replaced (e.g. `model.to()`)
    ema[0].fill_(0.0)
    update.fold(0.5, step=2)
    assert torch.equal(ema[0], torch.full((100,), 1.0))


# ---------------------------------------------------------------------------------------------------- ModelEMA
class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 300).to(dtype)
        self.b = nn.Linear(300, 8).to(torch.float32)  # a second group (fp32) beside the first
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def perturb(model, g):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
        model.count += 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_model_ema_equals_eager(monkeypatch, dtype):
    # The same run with the Triton update and with the eager kernels, a NaN at step 3: the same EMA, the same skip.
    models = {kernel: Net(dtype) for kernel in ("triton", "eager")}
    emas = {}
    for kernel, model in models.items():
        monkeypatch.setenv(D.KERNEL_ENV, kernel)
        emas[kernel] = ModelEMA(model, decay=0.9)
    assert emas["triton"]._updater.device_update is not None and emas["eager"]._updater.device_update is None
    for kernel, model in models.items():
        g = torch.Generator().manual_seed(0)
        for step in range(1, 7):
            perturb(model, g)
            saved = model.a.weight.data[0, 0].clone()
            if step == 3:
                model.a.weight.data[0, 0] = math.nan
            emas[kernel].update()
            model.a.weight.data[0, 0] = saved
    states = {k: e.state_dict() for k, e in emas.items()}
    for name, want in states["eager"]["tensors"].items():
        torch.testing.assert_close(states["triton"]["tensors"][name], want, rtol=2e-6, atol=2e-6, msg=name)
    for key in ("num_updates", "num_skipped", "decay", "step"):
        assert states["triton"][key] == states["eager"][key], key
    assert emas["triton"].last_skipped_step == 3 and emas["triton"].num_updates == 5


# ---------------------------------------------------------------------------------------------------- no host sync
class NoHostRead(TorchFunctionMode):
    """Fails on any operation that reads a tensor's value on the host (`.item()`, `bool()`, `int()`, `float()`,
    `.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`): on a GPU each of them waits for the device. Triton's
    interpreter itself, which stands in for the GPU here, is exempt."""

    FORBIDDEN = {
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
    }

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.to and any(str(a).startswith("cpu") for a in (*args[1:], *kwargs.values()))
        if (func in self.FORBIDDEN or to_host) and not self._in_interpreter():
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    @staticmethod
    def _in_interpreter() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "triton/runtime/interpreter" in frame.f_code.co_filename.replace("\\", "/"):
                return True
            frame = frame.f_back
        return False


def run_guarded(ema, model, steps, poison_at=()):
    """`steps` updates, each inside `NoHostRead`; returns the host reads seen."""
    g = torch.Generator().manual_seed(0)
    guard = NoHostRead()
    for step in range(1, steps + 1):
        perturb(model, g)
        saved = model.a.weight.data[0, 0].clone()
        if step in poison_at:
            model.a.weight.data[0, 0] = math.inf
        with guard:
            ema.update()
        model.a.weight.data[0, 0] = saved
    return guard.reads


@pytest.mark.parametrize("mode", ["skip", "raise", "ignore"])
@pytest.mark.parametrize("config", [{}, {"start_step": 2}, {"update_every": 2}, {"decay": 0.5}], ids=str)
def test_no_sync_in_update(mode, config):
    model = Net(torch.bfloat16)
    ema = ModelEMA(model, on_nonfinite=mode, **config)
    assert ema._updater.device_update is not None
    assert run_guarded(ema, model, steps=5) == []
    assert ema.num_skipped == 0 and ema.step == 5


def test_no_sync_guard_sees_the_eager_check(monkeypatch):
    # The guard is not blind: the eager kernels' check reads a flag on the host at every update (without a C
    # compiler: the native CPU kernel's check is C code, not a tensor read, and would not show).
    monkeypatch.setenv(D.KERNEL_ENV, "eager")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = Net(torch.bfloat16)
    ema = ModelEMA(model)
    assert ema._updater.device_update is None
    assert "__bool__" in run_guarded(ema, model, steps=2)


def test_no_sync_skip_is_counted_when_read(caplog):
    model = Net(torch.float32)
    ema = ModelEMA(model)
    assert run_guarded(ema, model, steps=4, poison_at={2}) == []
    # Known on the host only now (an earlier `update()` may have collected it without waiting).
    assert ema.num_skipped == 1 and ema.last_skipped_step == 2 and ema.num_updates == 3
    assert any("at step 2" in r.getMessage() and "'a.weight'" in r.getMessage() for r in caplog.records)


def test_no_sync_raise_surfaces_at_the_next_update():
    model = Net(torch.float32)
    ema = ModelEMA(model, on_nonfinite="raise")
    assert run_guarded(ema, model, steps=2, poison_at={2}) == []
    before = [e.clone() for e in ema.shadow]
    perturb(model, torch.Generator().manual_seed(5))
    with pytest.raises(NonFiniteWeightsError, match="at step 2 .*'a.weight'"):
        ema.update()
    # The EMA is still that of step 1; the raising update made no update.
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ema.shadow, before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_cuda_equals_float64_reference(monkeypatch, dtype):
    # The compiled kernel (not the interpreter), default block size, tensors of many blocks and odd tails.
    monkeypatch.delenv("TRITON_INTERPRET")
    sizes = [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 100_003]
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(n, generator=g).cuda() for n in sizes]
    live = [torch.randn(n, generator=g).to(dtype).cuda() for n in sizes]
    ref = [e.double() for e in ema]
    update = D.DeviceUpdate([(ema, live)], [0], check=True)
    for weight in (0.01, 0.3):
        update.fold(weight, step=1, force_check=weight > MAX_UNDO_WEIGHT)
        w32 = torch.tensor(weight, dtype=torch.float32).double()
        ref = [(1 - w32) * r + w32 * x.double() for r, x in zip(ref, live)]
    assert [o.folded for o in update.wait()] == [True, True]
    for e, r in zip(ema, ref):
        torch.testing.assert_close(e.double(), r, rtol=2e-6, atol=2e-6)
    before = [e.clone() for e in ema]
    live[6][-1] = math.nan
    update.fold(0.01, step=2)
    (outcome,) = update.wait()
    assert not outcome.folded and outcome.bad == (0, 6)
    for e, b, w in zip(ema, before, live):
        assert_restored(e.cpu(), b.cpu(), w.cpu(), 0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["skip", "raise", "ignore"])
@pytest.mark.parametrize("config", [{}, {"cuda_stream": True}, {"start_step": 2}], ids=str)
def test_no_sync_on_cuda(monkeypatch, mode, config):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(D.KERNEL_ENV, "auto")
    model = Net(torch.bfloat16).cuda()
    ema = ModelEMA(model, on_nonfinite=mode, **config)
    assert ema._updater.device_update is not None
    for _ in range(config.get("start_step", 0) + 2):  # outside: compiling each kernel variant may synchronise
        ema.update()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            with torch.no_grad():
                model.a.weight.add_(0.01)
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ema.num_skipped == 0


# ---------------------------------------------------------------------------------------------------- GPU code
def test_triton_kernel_compiles_for_hopper_with_128_bit_accesses(monkeypatch, tmp_path):
    # The interpreter does not generate code: compile each mode for an H100/H200 (sm_90) with Triton's own ptxas,
    # no GPU needed, and check that full blocks of aligned tensors move 16 bytes per access (scalar 2- or 4-byte
    # accesses would cap the update well below the bandwidth floor).
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_ema.engine import triton_kernels as TK

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    signature = {"ema_base": "*fp32", "ema_offsets": "*i64", "live_offsets": "*i64", "numels": "*i64"}
    signature.update(block_tensor="*i32", block_start="*i64", n_blocks="i32", flags="*i32", prev="*i32")
    signature.update(force="i32", weight="fp32", tensor_base="i32")
    for live, bits, exp, align in (("bf16", TK.tl.int16, 0x7F80, 8), ("fp32", TK.tl.int32, 0x7F800000, 4)):
        for mode in (TK.UPDATE, TK.CHECK, TK.COPY, TK.UNDO):
            constexprs = {"MODE": mode, "CHECKED": True, "ALIGNED": True, "LIVE_ALIGN": align, "BLOCK": 4096}
            constexprs.update(BITS=bits, EXP=exp)
            full = {**signature, "live_base": f"*{live}", **{k: "constexpr" for k in constexprs}}
            attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
            source = ASTSource(fn=TK.kernel(), signature=full, constexprs=constexprs, attrs=attrs)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
            if mode != TK.CHECK:  # reads the weights and reads and writes the EMA
                assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (live, mode)
            else:
                assert "ld.global.v4" in ptx and "st.global.v4" not in ptx, (live, mode)

"""Every EMA update path against the plain formula `ema = beta * ema + (1 - beta) * w`, computed here in float64."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hf_ema import ModelEMA
from hf_ema.compat import torch as torch_compat
from hf_ema.engine import kernels as K
from hf_ema.engine import native as N
from hf_ema.engine.kernels import LerpKernel, lerp_

SHAPES = [(37, 19), (5,), (300, 70), (3, 4, 5)]


def make_tensors(dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    if noncontiguous:
        # A transposed view: the chunked path must handle strides.
        out.append(torch.randn(23, 41, generator=g).to(dtype).t())
    return out


def reference_steps(ema0, lives, weights):
    ema = [e.double() for e in ema0]
    for live, w in zip(lives, weights):
        ema = [(1 - w) * e + w * x.double() for e, x in zip(ema, live)]
    return ema


def assert_close(got, ref, ema_dtype):
    # One fp32 rounding per step (lerp may fuse into an FMA): a few ulps after a few steps.
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[ema_dtype]
    for g, r in zip(got, ref):
        assert g.dtype == ema_dtype
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


def run_kernel(backend, live_dtype, ema_dtype=torch.float32, chunk_numel=None, noncontiguous=False):
    """Three updates through one kernel; returns the kernel, the EMA and its float64 reference (the caller compares)."""
    lives = [make_tensors(live_dtype, seed=s, noncontiguous=noncontiguous) for s in range(1, 4)]
    ema0 = [t.to(ema_dtype) for t in make_tensors(live_dtype, seed=0, noncontiguous=noncontiguous)]
    ema = [e.clone() for e in ema0]
    # The kernel reads the same `live` tensors at every call (model parameters): update them in place.
    live = [t.clone() for t in lives[0]]
    kernel = LerpKernel(ema, live, backend=backend, chunk_numel=chunk_numel)
    weights = [0.3, 0.01, 0.5]
    for step_live, w in zip(lives, weights):
        for dst, src in zip(live, step_live):
            dst.copy_(src)
        kernel(w)
    return kernel, ema, reference_steps(ema0, lives, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_same_dtype(dtype):
    kernel, ema, ref = run_kernel("auto", dtype, ema_dtype=dtype)
    assert kernel.backend == "foreach"
    assert_close(ema, ref, dtype)


@pytest.mark.parametrize("live_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_numel", [64, 4096, None])
def test_chunked_mixed_precision(live_dtype, chunk_numel):
    # 64 splits every tensor into many pieces, 4096 packs several tensors per batch, None is the default size.
    kernel, ema, ref = run_kernel("chunked", live_dtype, chunk_numel=chunk_numel, noncontiguous=True)
    assert kernel.backend == "chunked"
    assert_close(ema, ref, torch.float32)


def test_chunked_large_noncontiguous_tensor():
    # A non-contiguous tensor larger than the scratch buffer (16 elements) is upcast whole; its EMA is the formula's.
    kernel, ema, ref = run_kernel("chunked", torch.bfloat16, chunk_numel=16, noncontiguous=True)
    transposed = ema[-1]
    assert not transposed.is_contiguous() and transposed.numel() > 16
    assert_close([transposed], [ref[-1]], torch.float32)
    assert_close(ema, ref, torch.float32)


def test_chunked_bf16_ema_of_fp32_weights():
    # A bf16 EMA (not the default) of fp32 weights: the formula to bf16 precision.
    _, ema, ref = run_kernel("chunked", torch.float32, ema_dtype=torch.bfloat16)
    assert_close(ema, ref, torch.bfloat16)


def test_foreach_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="equal dtypes"):
        LerpKernel([torch.zeros(3)], [torch.zeros(3, dtype=torch.bfloat16)], backend="foreach")
    with pytest.raises(ValueError, match="backend"):
        LerpKernel([torch.zeros(3)], [torch.zeros(3)], backend="triton")


@pytest.mark.skipif(not K.compile_available("cpu"), reason="no C++ compiler for inductor")
@pytest.mark.parametrize("live_dtype", [torch.bfloat16, torch.float16])
def test_compiled_mixed_precision(live_dtype):
    kernel, ema, ref = run_kernel("compiled", live_dtype, noncontiguous=True)
    assert kernel.backend == "compiled"
    assert_close(ema, ref, torch.float32)


def test_compile_failure_falls_back(monkeypatch, caplog):
    def broken():
        def fn(*args):
            raise RuntimeError("no compiler here")

        return fn

    monkeypatch.setattr(K, "_fresh_compiled_lerp", broken)
    with caplog.at_level(logging.WARNING, logger="hf_ema.engine.kernels"):
        kernel, ema, ref = run_kernel("compiled", torch.bfloat16)
    assert kernel.backend == "chunked"
    assert "compiling the EMA update failed" in caplog.text
    assert_close(ema, ref, torch.float32)  # the failed compile wrote nothing; the fallback made all three updates


def test_auto_choice(monkeypatch):
    ema = [torch.zeros(8)]
    low = [torch.zeros(8, dtype=torch.bfloat16)]
    monkeypatch.delenv(K.COMPILE_ENV, raising=False)
    monkeypatch.setattr(K, "compile_available", lambda device: True)
    assert LerpKernel(ema, [torch.zeros(8)]).backend == "foreach"
    # CPU, bf16/fp16 weights into an fp32 EMA, a C compiler on the PATH: the native kernel, whatever the size.
    monkeypatch.setattr(N, "compiler", lambda: "/usr/bin/cc")
    assert LerpKernel(ema, low).backend == "native"
    assert LerpKernel(ema, [torch.zeros(8, dtype=torch.float16)]).backend == "native"
    assert LerpKernel([torch.zeros(8, dtype=torch.float64)], low).backend != "native"  # fp64 EMA: not its case
    monkeypatch.setenv(K.COMPILE_ENV, "never")
    assert LerpKernel(ema, low).backend == "chunked"
    monkeypatch.delenv(K.COMPILE_ENV)
    # Without a C compiler: small mixed group, compiling does not pay off.
    monkeypatch.setattr(N, "compiler", lambda: None)
    assert LerpKernel(ema, low).backend == "chunked"
    monkeypatch.setattr(K, "COMPILE_MIN_NUMEL", 8)
    assert LerpKernel(ema, low).backend == "compiled"
    monkeypatch.setenv(K.COMPILE_ENV, "never")
    assert LerpKernel(ema, low).backend == "chunked"
    monkeypatch.setenv(K.COMPILE_ENV, "always")
    monkeypatch.setattr(K, "COMPILE_MIN_NUMEL", 1 << 40)
    assert LerpKernel(ema, low).backend == "compiled"
    # Fast path unavailable: the fallback, whatever the mode.
    monkeypatch.setattr(K, "compile_available", lambda device: False)
    assert LerpKernel(ema, low).backend == "chunked"


native_available = pytest.mark.skipif(N.compiler() is None, reason="no C compiler for the native kernel")


@native_available
@pytest.mark.parametrize("live_dtype", [torch.bfloat16, torch.float16])
def test_native_mixed_precision(live_dtype):
    kernel, ema, ref = run_kernel("native", live_dtype, noncontiguous=True)  # the transposed one folds in eagerly
    assert kernel.backend == "native"
    assert_close(ema, ref, torch.float32)


@native_available
@pytest.mark.parametrize("live_dtype", [torch.bfloat16, torch.float16])
def test_native_upcast_is_exact_for_every_bit_pattern(live_dtype):
    # weight 1 from a zero EMA: ema = 0 + 1 * (x - 0) = x, so the EMA shows the kernel's conversion of every one of
    # the 65,536 16-bit values (normal, subnormal, zero, inf, nan), against torch's own.
    live = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(live_dtype)
    ema = torch.zeros(live.shape, dtype=torch.float32)
    LerpKernel([ema], [live], backend="native")(1.0)
    expected = live.float()
    finite = expected.isfinite()
    assert torch.equal(ema[finite], expected[finite])
    assert torch.equal(ema.isnan(), expected.isnan()) and torch.equal(ema.isinf(), expected.isinf())
    assert torch.equal(ema[expected.isinf()], expected[expected.isinf()])


@native_available
def test_native_follows_storage_that_moved():
    ema = [torch.zeros(70_000), torch.zeros(5)]
    live = [torch.ones(70_000, dtype=torch.bfloat16), torch.ones(5, dtype=torch.bfloat16)]
    kernel = LerpKernel(ema, live, backend="native")
    kernel(0.5)
    old_storage = ema[0].clone()
    ema[0].data = ema[0].data.clone()  # the EMA tensor now lives elsewhere (e.g. `param.data = ...`)
    live[0].data = torch.full((70_000,), 3.0, dtype=torch.bfloat16)
    kernel(0.5)
    assert torch.equal(ema[0], torch.full((70_000,), 0.5 + 0.5 * (3.0 - 0.5)))
    assert torch.equal(ema[1], torch.full((5,), 0.75))
    assert torch.equal(old_storage, torch.full((70_000,), 0.5))


def test_native_build_failure_falls_back(monkeypatch, caplog):
    # A fresh process state with no compiler: the first update warns and uses the eager chunked kernel.
    monkeypatch.setattr(N, "_library", None)
    monkeypatch.setattr(N, "_error", None)
    monkeypatch.setattr(N, "compiler", lambda: None)
    monkeypatch.setattr(K, "compile_available", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="hf_ema.engine.kernels"):
        kernel, ema, ref = run_kernel("native", torch.bfloat16)
    assert kernel.backend == "chunked"
    assert_close(ema, ref, torch.float32)
    assert "native EMA kernel is unavailable (no C compiler found" in caplog.text
    with pytest.raises(ValueError, match="`backend='native'` needs CPU tensors"):
        LerpKernel([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.bfloat16)], backend="native")


def test_compile_available_without_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    monkeypatch.setattr(torch_compat.shutil, "which", lambda name: None)
    assert K.compile_available("cpu") is False


def test_free_function_lerp_mixed():
    ema0 = [t.float() for t in make_tensors(torch.bfloat16, seed=0)]
    live = make_tensors(torch.bfloat16, seed=1)
    ema = [e.clone() for e in ema0]
    lerp_(ema, live, 0.25)
    assert_close(ema, reference_steps(ema0, [live], [0.25]), torch.float32)


# ---------------------------------------------------------------------- through ModelEMA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 40)
        self.norm = nn.LayerNorm(40)
        self.register_buffer("running", torch.zeros(40))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def train_and_reference(model, ema, steps, decay, update_every=1, seed=0):
    """Perturb the weights like an optimizer would; return the float64 reference EMA of the averaged tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors["running"] = model.running
    ref = {n: t.detach().double().clone() for n, t in tensors.items()}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for t in tensors.values():
                # Steps well below bf16 resolution too: a bf16 EMA would lose them.
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.05)
            model.count += 1
        ema.update()
        if step % update_every == 0:
            beta = decay**update_every
            ref = {n: beta * ref[n] + (1 - beta) * tensors[n].detach().double() for n in ref}
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("update_every", [1, 3])
def test_model_ema_paths(dtype, update_every):
    model = Tiny().to(dtype)
    ema = ModelEMA(model, decay=0.9, update_every=update_every)
    ref = train_and_reference(model, ema, steps=7, decay=0.9, update_every=update_every)
    state = ema.state_dict()["tensors"]
    assert_close([state[n] for n in ref], [ref[n] for n in ref], torch.float32)
    # Non-float buffers are copied at each update, i.e. at the last step that `update_every` keeps.
    assert int(state["count"]) == 7 - 7 % update_every
    mixed = "native" if N.compiler() is not None else "chunked"
    # With the default NaN check (on_nonfinite="skip"), fp32 weights also take the native kernel, where it is fused.
    expected = ("native" if N.compiler() is not None else "foreach") if dtype == torch.float32 else mixed
    assert [k.backend for k in ema._updater.kernels] == [expected]
    unchecked = ModelEMA(model, decay=0.9, on_nonfinite="ignore")
    assert [k.backend for k in unchecked._updater.kernels] == ["foreach" if dtype == torch.float32 else mixed]


def test_model_ema_with_compile_disabled(monkeypatch):
    # The fast path forced off through the environment, on a group big enough for it in auto mode.
    monkeypatch.setenv(K.COMPILE_ENV, "never")
    monkeypatch.setattr(K, "COMPILE_MIN_NUMEL", 1)
    model = Tiny().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.8)
    ref = train_and_reference(model, ema, steps=4, decay=0.8)
    state = ema.state_dict()["tensors"]
    assert_close([state[n] for n in ref], [ref[n] for n in ref], torch.float32)
    assert [k.backend for k in ema._updater.kernels] == ["chunked"]


def test_fp32_ema_keeps_updates_below_bf16_resolution():
    # With weight 1e-3 and a change of 1e-3 relative, each step moves a bf16 EMA by less than half an ulp.
    live = [torch.ones(1000, dtype=torch.bfloat16)]
    ema32 = [torch.ones(1000)]
    ema16 = [torch.ones(1000, dtype=torch.bfloat16)]
    k32 = LerpKernel(ema32, live, backend="chunked")
    live[0].fill_(1.0078125)  # one bf16 ulp above 1
    for _ in range(10):
        k32(1e-3)
        torch._foreach_lerp_(ema16, live, 1e-3)
    assert torch.all(ema16[0] == 1.0)
    expected = 1.0078125 - 0.0078125 * (1 - 1e-3) ** 10
    torch.testing.assert_close(ema32[0], torch.full((1000,), expected), rtol=1e-6, atol=1e-7)

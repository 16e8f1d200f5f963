"""The Triton kernel of the GPU update: one launch folds a whole group of tensors, with the non-finite check fused.

One kernel, four modes (a `MODE` constant, so each compiles to straight-line code):

- `UPDATE`: `ema += w * (x - ema)` for every element of every tensor of the group, reading each weight once and
  reading and writing the fp32 EMA once (the 12 bytes per parameter of fp32 weights, 10 of bf16 ones: the floor).
  With `CHECK`, the same loop tests each weight's exponent bits (all ones: NaN or inf), keeps the EMA of such an
  element as it was, and raises the `FUSED` flag: the check adds no memory traffic.
- `CHECK`: read-only, raises the `PRE` flag when a weight is not finite. Runs only when asked (`force`, or the
  previous update was skipped: `prev`); otherwise every program returns at once.
- `COPY`: `ema = x` (before `start_step`, `reset()`), gated on `PRE` like `UPDATE`.
- `UNDO`: only when `FUSED` is up and `PRE` is not (the update was written, then found to meet a NaN/inf here or on
  another rank): restores `ema` from `ema' = ema + w (x - ema)`, otherwise returns at once.

The tensors of a group are addressed from two base tensors (`ema_base`, `live_base`) by element offsets in a
device-side table, one row per block of `BLOCK` elements. Offsets from a 16-byte-aligned base that are multiples of
16 bytes let Triton prove alignment and issue 128-bit loads (`ALIGNED`); tensors whose storage is not so aligned go
to a second table without the hint. The skip decision never leaves the device: the flags are int32 device memory,
read by the next kernels of the same update, and copied to the host only asynchronously (`hf_ema.engine.device`).

Imported only when a Triton update is built (`triton` is an optional dependency). On a machine without a GPU the
kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, CPU tensors), which is how the tests run it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import triton
import triton.language as tl

__all__ = ["CHECK", "COPY", "FIRST", "FUSED", "PRE", "UNDO", "UPDATE", "interpreting", "kernel", "tl"]

#: Modes of the kernel.
UPDATE, CHECK, COPY, UNDO = 0, 1, 2, 3
#: Slots of the int32 flags tensor: a weight was not finite in the read-only check (nothing written) / in the fused
#: update (written, to be undone); the smallest index of a tensor holding one (for the error message).
PRE, FUSED, FIRST = 0, 1, 2
#: The jitted helpers the kernel calls, bound by `kernel()` for the current mode.
_raise_flags_jit: Any = None
_unlerp_jit: Any = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (`TRITON_INTERPRET=1`: CPU tensors, no GPU needed)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _ema_kernel(
    ema_base,
    live_base,
    ema_offsets,
    live_offsets,
    numels,
    block_tensor,
    block_start,
    n_blocks,
    flags,
    prev,
    force,
    weight,
    tensor_base,
    MODE: tl.constexpr,
    CHECKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    LIVE_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    EXP: tl.constexpr,
):
    # Whether this launch has work: decided on the device, from the flags of this update, never by the host.
    if MODE == 1:
        run = (force + tl.load(prev)) > 0
    elif MODE == 3:
        run = (tl.load(flags + 1) > 0) & (tl.load(flags) == 0)
    elif CHECKED:
        run = tl.load(flags) == 0
    else:
        run = n_blocks > 0
    if run:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        for b in range(pid, n_blocks, nprog):
            t = tl.load(block_tensor + b)
            start = tl.load(block_start + b)
            n = tl.load(numels + t)
            live_off = tl.load(live_offsets + t)
            ema_off = tl.load(ema_offsets + t)
            if ALIGNED:
                # 16-byte aligned rows (4 fp32 or 8 16-bit elements): Triton can then issue 128-bit accesses.
                live_off = tl.multiple_of(live_off, LIVE_ALIGN)
                ema_off = tl.multiple_of(ema_off, 4)
            # Blocks start at multiples of BLOCK; a tensor's full blocks load and store unmasked (Triton can then
            # prove whole 16-byte vectors in bounds), its last partial block masked.
            start = tl.multiple_of(start, BLOCK)
            idx = start + tl.arange(0, BLOCK)
            mask = idx < n
            full = start + BLOCK <= n
            live_ptr = live_base + live_off + idx
            ema_ptr = ema_base + ema_off + idx
            if full:
                raw = tl.load(live_ptr)
            else:
                raw = tl.load(live_ptr, mask=mask, other=0)
            # Exponent bits all ones: NaN, inf or -inf (exact, and free of float compares).
            bad = ((raw.to(BITS, bitcast=True) & EXP) == EXP) & mask
            if MODE != 1:
                if full:
                    e = tl.load(ema_ptr)
                else:
                    e = tl.load(ema_ptr, mask=mask, other=0.0)
                x = raw.to(tl.float32)
                # The weight as an fp32 tensor, in the compiler and in the interpreter alike.
                w = tl.full([BLOCK], 0.0, tl.float32) + weight
                if MODE == 0:
                    new = e + w * (x - e)
                elif MODE == 2:
                    new = x
                else:
                    new = _unlerp_jit(e, x, w)
                if CHECKED or MODE == 3:
                    new = tl.where(bad, e, new)  # a non-finite weight's element is never written
                if full:
                    tl.store(ema_ptr, new)
                else:
                    tl.store(ema_ptr, new, mask=mask)
            if CHECKED and MODE != 3:
                _raise_flags_jit(flags, bad, tensor_base + t, MODE, BLOCK)


def _raise_flags(flags, bad, tensor_index, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # Raise the flag from the lanes that met a non-finite weight (no reduction: predicated off where all are
    # finite): PRE for the read-only check, FUSED for the update; FIRST takes the smallest tensor index.
    zero = tl.full([BLOCK], 0, tl.int32)
    if MODE == 1:
        tl.atomic_max(flags + zero, zero + 1, mask=bad)
    else:
        tl.atomic_max(flags + 1 + zero, zero + 1, mask=bad)
    tl.atomic_min(flags + 2 + zero, zero + tensor_index, mask=bad)


def _unlerp(e, x, w):
    # Undo: the value e0 with fl(e0 + w (x - e0)) == e, as native.py's unlerp_one finds it: the estimate
    # (e - w x) / (1 - w) in double, then whichever of it and its two fp32 neighbours the update (the same fp32
    # expression as MODE 0) maps back to e, the closest to the estimate; the estimate itself when none does. Exact
    # for most elements, else within the update's own rounding.
    w64 = w.to(tl.float64)
    est = (e.to(tl.float64) - w64 * x.to(tl.float64)) / (1.0 - w64)
    mid = est.to(tl.float32)
    mid_bits = mid.to(tl.int32, bitcast=True)
    lo = (mid_bits - 1).to(tl.float32, bitcast=True)
    hi = (mid_bits + 1).to(tl.float32, bitcast=True)
    d_mid = tl.abs(mid.to(tl.float64) - est)
    d_lo = tl.abs(lo.to(tl.float64) - est)
    d_hi = tl.abs(hi.to(tl.float64) - est)
    far = d_mid + d_lo + d_hi + 1.0
    d_mid = tl.where((mid + w * (x - mid)) == e, d_mid, far)
    d_lo = tl.where((lo + w * (x - lo)) == e, d_lo, far)
    d_hi = tl.where((hi + w * (x - hi)) == e, d_hi, far)
    new = tl.where(d_lo < d_mid, lo, mid)
    return tl.where(d_hi < tl.minimum(d_mid, d_lo), hi, new)


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> tuple:
    del interpret  # the cache key: `triton.jit` picks the interpreter or the compiler when it decorates
    return triton.jit(_ema_kernel), triton.jit(_raise_flags), triton.jit(_unlerp)


def kernel():
    """The `@triton.jit` EMA kernel for the current `TRITON_INTERPRET` setting (decorated at first use, not at import,
    so that a test can switch the interpreter on before)."""
    kernel_fn, raise_flags, unlerp = _jitted(interpreting())
    # The kernel calls its helpers by these global names: bind the ones decorated for the same mode (a process may
    # compile for the GPU and interpret, as the tests do; the helpers must match the kernel that calls them).
    globals().update(_raise_flags_jit=raise_flags, _unlerp_jit=unlerp)
    return kernel_fn

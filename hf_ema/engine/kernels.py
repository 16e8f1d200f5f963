"""The update passes: one multi-tensor call per (device, dtype) group, never a Python loop of small ops.

Four ways to compute `ema += weight * (live - ema)`, picked per group by [`LerpKernel`] (see
the README section "Performance" for the measurements behind the choice):

- `"foreach"`: `torch._foreach_lerp_`, when the EMA and the weights share a dtype. It runs at the copy-bandwidth
  floor, so nothing is gained by compiling it.
- `"native"`: on CPU, for bf16/fp16 weights and an fp32 EMA, a C kernel built at first use with the system C
  compiler in well under a second (`hf_ema.engine.native`): one OpenMP parallel region over the whole group, each weight
  upcast in registers. If it cannot be built, the group falls back to `"compiled"` or `"chunked"`, with a warning.
  With the non-finite check on (`check_finite=True`, what `EMAConfig(on_nonfinite="skip")` asks), it also takes
  fp32 weights, because it tests the weights for NaN/inf in the very loop that folds them in: the check costs no
  extra pass over the weights.
- `"compiled"`: a `torch.compile`d fused kernel for mixed precision (bf16/fp16 weights, fp32 EMA) that upcasts each
  weight in registers: one pass, no fp32 copy of the weights. Compiling costs seconds once, so `"auto"` uses it
  only for groups of at least `COMPILE_MIN_NUMEL` elements, and only when a compiler is there (a C++ compiler on
  CPU, Triton on CUDA). If compiling fails, the group falls back to `"chunked"` for good, with a warning.
- `"chunked"`: the fallback for mixed precision: the weights are upcast a chunk at a time into one small reusable
  scratch buffer (`chunk_numel` elements, cache-sized) and folded in with `_foreach_lerp_`. No allocation per step,
  no full-size temporary.

The non-finite check (`fold_checked`): the native kernel runs it fused into the update; every other backend reads
the weights once more before the update (`all_finite`: one `_foreach_norm` pass, a host synchronisation on CUDA).

The environment variable `HF_EMA_COMPILE` (`auto`, `never`, `always`) overrides the automatic choice: `never` builds
nothing at run time (eager kernels only), `always` uses `torch.compile` for every mixed-precision group.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..compat.torch import compile_supported, foreach_copy_, foreach_lerp_, foreach_norm

if TYPE_CHECKING:
    from .native import NativeLerp

__all__ = [
    "BACKENDS",
    "COMPILE_ENV",
    "COMPILE_MIN_NUMEL",
    "LerpKernel",
    "MAX_UNDO_WEIGHT",
    "all_finite",
    "compile_available",
    "copy_",
    "first_nonfinite",
    "lerp_",
    "unlerp_",
]

logger = logging.getLogger(__name__)

#: The update implementations a [`LerpKernel`] can use.
BACKENDS = ("foreach", "native", "compiled", "chunked")
#: Environment variable: `auto` (default), `never` (eager kernels only, nothing built at run time) or `always`
#: (`torch.compile` every mixed group).
COMPILE_ENV = "HF_EMA_COMPILE"
#: Mixed-precision groups smaller than this stay eager in `auto` mode: compiling costs 8-40 s once (less with a warm
#: inductor cache), the fused kernel saves about 0.07 ms per million elements per step over the chunked fallback on
#: a 2-core CPU (benchmarks/kernel_variants.py), so it pays off after some thousands of steps.
COMPILE_MIN_NUMEL = 1 << 24
#: Scratch size of the chunked fallback, in elements (4 MiB of fp32): the fastest of 2**16 .. 2**22 measured by
#: benchmarks/kernel_variants.py on CPU. On CUDA a larger chunk amortises the kernel launches.
CPU_CHUNK_NUMEL = 1 << 20
CUDA_CHUNK_NUMEL = 1 << 24
#: Above this interpolation weight (`1 - beta`: the first updates of a warmup or power-function schedule) an update is
#: checked before it is made, instead of made with the check fused in and undone if it meets a NaN: undoing divides
#: by `1 - weight`.
MAX_UNDO_WEIGHT = 0.1


def _compile_mode() -> str:
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    return {"0": "never", "false": "never", "off": "never", "1": "always", "true": "always", "on": "always"}.get(
        mode, mode
    )


def compile_available(device: torch.device | str) -> bool:
    """Whether `torch.compile` can build a kernel for `device` here: Dynamo supports this Python, and inductor has
    a C++ compiler (CPU) or Triton (CUDA). A `True` is no promise that compiling succeeds: [`LerpKernel`] still
    falls back when it fails.

    Args:
        device (`torch.device` or `str`): Where the kernel would run.
    """
    return compile_supported(device)


def _fused_lerp(ema: list[torch.Tensor], live: list[torch.Tensor], weight: torch.Tensor) -> None:
    for e, w in zip(ema, live):
        # Inductor fuses the upcast, the lerp and the in-place store into one read of each operand.
        e.copy_(e + weight * (w.to(e.dtype) - e))


def _fresh_compiled_lerp():
    # Dynamo keys its cache, and its recompile limit, on the code object: a fresh copy per group keeps the groups of
    # many EMAs in one process from evicting each other (and from silently falling back to eager).
    code = _fused_lerp.__code__.replace(co_name=f"_fused_lerp_{id(object())}")
    fn = types.FunctionType(code, _fused_lerp.__globals__, code.co_name)
    return torch.compile(fn, fullgraph=True, dynamic=False)


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first tensor holding a NaN or an inf, or `None` when all are finite (one exact pass per
    tensor: for error messages and to confirm [`all_finite`], not for every step).

    Args:
        tensors (`Sequence[torch.Tensor]`): The tensors to test.
    """
    for i, t in enumerate(tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return i
    return None


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one multi-tensor pass (the 2-norm of each tensor is NaN or
    inf when the tensor holds one), confirmed exactly when a norm overflowed. A host synchronisation on CUDA.

    Args:
        tensors (`Sequence[torch.Tensor]`): Floating-point tensors on one device.
    """
    tensors = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    # 16-bit norms are accumulated and returned in fp32: an fp16 result overflows at 65504 for finite weights.
    dtype = torch.float32 if tensors[0].element_size() < 4 else None
    if bool(torch.stack(foreach_norm(tensors, dtype=dtype)).isfinite().all()):
        return True
    # A norm also overflows for huge finite values: decide exactly.
    return first_nonfinite(tensors) is None


@torch.no_grad()
def unlerp_(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], weight: float) -> None:
    """Undo `ema += weight * (live - ema)` (`weight < 1`): `ema = (ema - weight * live) / (1 - weight)`, in double,
    a slice at a time: within the rounding error of the update itself. The rare path of a skipped update.

    Args:
        ema (`Sequence[torch.Tensor]`): The EMA tensors, restored in place.
        live (`Sequence[torch.Tensor]`): The weights the update read (unchanged since).
        weight (`float`): The interpolation weight of the update to undo.
    """
    inv = 1.0 / (1.0 - weight)
    for e, w in zip(ema, live):
        pairs = [(e.view(-1), w.view(-1))] if e.is_contiguous() and w.is_contiguous() else [(e, w)]
        for ef, wf in pairs:
            if ef.dim() != 1:
                ef.copy_((ef.double() - weight * wf.double()) * inv)
                continue
            for start in range(0, ef.numel(), CPU_CHUNK_NUMEL):
                piece = ef[start : start + CPU_CHUNK_NUMEL]
                src = wf[start : start + CPU_CHUNK_NUMEL]
                piece.copy_((piece.double() - weight * src.double()) * inv)


class LerpKernel:
    """The update `ema[i] += weight * (live[i] - ema[i])` for one group of tensors, with the fastest correct
    implementation for their dtypes, device and size chosen once.

    Args:
        ema (`list[torch.Tensor]`): The EMA tensors (one device, one dtype), updated in place.
        live (`list[torch.Tensor]`): The current weights (one device, one dtype), same shapes. They are read at every
            call, so they must keep their storage (model parameters do).
        backend (`str`, *optional*, defaults to `"auto"`): `"auto"`, or one of `"foreach"` (same dtypes only),
            `"native"` (CPU, bf16/fp16 weights, fp32 EMA), `"compiled"`, `"chunked"`.
        chunk_numel (`int`, *optional*): Scratch size of the chunked path; defaults to 2**20 on CPU, 2**24 on CUDA.
        check_finite (`bool`, *optional*, defaults to `False`): The kernel will run `fold_checked` (the update only
            when every weight is finite): `"auto"` then also picks the native kernel, where the check is fused, for
            fp32 weights and an fp32 EMA on the CPU.
    """

    def __init__(
        self,
        ema: Sequence[torch.Tensor],
        live: Sequence[torch.Tensor],
        backend: str = "auto",
        chunk_numel: int | None = None,
        check_finite: bool = False,
    ) -> None:
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"`backend` must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if len(ema) != len(live):
            raise ValueError(f"`ema` and `live` must have the same length, got {len(ema)} and {len(live)}")
        self.ema = list(ema)
        self.live = list(live)
        self.numel = sum(t.numel() for t in self.ema)
        device = self.ema[0].device if self.ema else torch.device("cpu")
        self.device = device
        self.mixed = bool(self.ema) and self.ema[0].dtype != self.live[0].dtype
        self.check_finite = bool(check_finite)
        self.chunk_numel = chunk_numel or (CUDA_CHUNK_NUMEL if device.type == "cuda" else CPU_CHUNK_NUMEL)
        if backend == "auto":
            backend = self._auto_backend()
        elif backend == "foreach" and self.mixed:
            raise ValueError(
                f"`backend='foreach'` needs equal dtypes, got EMA {self.ema[0].dtype} and weights {self.live[0].dtype}"
            )
        if backend == "native" and not self._native_eligible(allow_f32=True):
            raise ValueError(
                "`backend='native'` needs CPU tensors, bf16/fp16/fp32 weights and an fp32 EMA, got weights "
                f"{self.live[0].dtype if self.live else None} and EMA {self.ema[0].dtype if self.ema else None} "
                f"on {device}"
            )
        self.backend = backend
        self._native: NativeLerp | None = None
        self._native_ready = False
        self._compiled: Callable[..., Any] | None = None
        self._weight: torch.Tensor | None = None
        self._plan: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._oversized: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _native_eligible(self, allow_f32: bool = False) -> bool:
        weights = (torch.bfloat16, torch.float16, torch.float32) if allow_f32 else (torch.bfloat16, torch.float16)
        return (
            bool(self.ema)
            and self.device.type == "cpu"
            and self.ema[0].dtype == torch.float32
            and self.live[0].dtype in weights
        )

    def _compiled_or_chunked(self) -> str:
        mode = _compile_mode()
        if mode == "never" or not compile_available(self.device):
            return "chunked"
        if mode == "always" or self.numel >= COMPILE_MIN_NUMEL:
            return "compiled"
        return "chunked"

    def _auto_backend(self) -> str:
        mode = _compile_mode()
        if not self.mixed:
            # With the check on, the native kernel fuses it into the update; `_foreach_lerp_` would need a second
            # pass over the weights (a third more memory traffic for fp32).
            if self.check_finite and mode == "auto" and self._native_eligible(allow_f32=True):
                from .native import compiler

                if compiler() is not None:
                    return "native"
            return "foreach"
        if mode == "auto" and self._native_eligible():
            from .native import compiler

            if compiler() is not None:
                return "native"
        return self._compiled_or_chunked()

    def __call__(self, weight: float) -> None:
        """Fold the weights into the EMA with interpolation weight `weight` (`1 - beta`).

        Args:
            weight (`float`): The interpolation weight, in [0, 1].
        """
        if not self.ema:
            return
        if self.backend == "foreach":
            foreach_lerp_(self.ema, self.live, weight)
        elif self.backend == "native":
            self._native_call(weight)
        elif self.backend == "compiled":
            self._compiled_call(weight)
        else:
            self._chunked_call(weight)

    # ------------------------------------------------------------------ checked update
    @property
    def fused_check(self) -> bool:
        """Whether `fold_checked` tests the weights inside the update (the native kernel) rather than in a pass of
        its own before it."""
        return self.backend == "native"

    def all_finite(self) -> bool:
        """Whether every weight of the group is finite (read-only; a host synchronisation on CUDA)."""
        if not self.ema:
            return True
        if self.backend == "native" and self._ensure_native():
            if self._native is not None and not self._native.all_finite():
                return False
            return all_finite([w for _, w in self._oversized])
        return all_finite(self.live)

    def fold_checked(self, weight: float) -> bool:
        """Fold the weights in, unless one of them is NaN or inf: then the EMA is left as it was.

        The native kernel tests the weights in the loop that folds them in (a non-finite weight's element keeps its
        value), stops at the end of the first block of 4096 holding one and undoes what it folded in (most
        elements bit for bit, every one within the rounding error of the update);
        with `weight > MAX_UNDO_WEIGHT`, and on every other backend, the weights are checked in a pass of their own
        first, and nothing is written.

        Args:
            weight (`float`): The interpolation weight, in [0, 1].

        Returns:
            `bool`: whether the weights were all finite and folded in.
        """
        if not self.ema:
            return True
        if self.backend == "native" and weight <= MAX_UNDO_WEIGHT and self._ensure_native():
            if not all_finite([w for _, w in self._oversized]):
                return False
            if self._native is not None and not self._native.fold_checked(weight):
                return False
            for e, w in self._oversized:
                e.lerp_(w.to(e.dtype), weight)
            return True
        if not self.all_finite():
            return False
        self(weight)
        return True

    @torch.no_grad()
    def undo(self, weight: float) -> None:
        """Undo the last update, made with `weight` (`< 1`) from the weights as they still are: used when another
        group or another rank met a non-finite weight after this group was folded in.

        Args:
            weight (`float`): The interpolation weight of the update to undo.
        """
        if not self.ema:
            return
        if self.backend == "native" and self._native_ready:
            if self._native is not None:
                self._native.undo(weight)
            unlerp_([e for e, _ in self._oversized], [w for _, w in self._oversized], weight)
            return
        unlerp_(self.ema, self.live, weight)

    # ------------------------------------------------------------------ native
    def _ensure_native(self) -> bool:
        """Build the native kernel at first use; `False` when it cannot be built (the group then falls back)."""
        if self._native_ready:
            return True
        from .native import NativeBuildError, NativeLerp

        pairs = list(zip(self.ema, self.live))
        contiguous = [(e, w) for e, w in pairs if e.is_contiguous() and w.is_contiguous()]
        try:
            native = NativeLerp([e for e, _ in contiguous], [w for _, w in contiguous]) if contiguous else None
        except NativeBuildError as err:
            fallback = self._compiled_or_chunked() if self.mixed else "foreach"
            logger.warning("hf-ema: the native EMA kernel is unavailable (%s); using the %s update", err, fallback)
            self.backend = fallback
            return False
        # A non-contiguous tensor (rare) is folded in eagerly, as in the chunked kernel.
        self._oversized = [(e, w) for e, w in pairs if not (e.is_contiguous() and w.is_contiguous())]
        self._native = native  # None: all non-contiguous
        self._native_ready = True
        return True

    def _native_call(self, weight: float) -> None:
        if not self._ensure_native():
            self(weight)
            return
        if self._native is not None:
            self._native(weight)
        for e, w in self._oversized:
            e.lerp_(w.to(e.dtype), weight)

    # ------------------------------------------------------------------ compiled
    def _compiled_call(self, weight: float) -> None:
        if self._weight is None:
            # A 0-dim tensor, not a Python float: a float would be baked into the graph and recompiled every step.
            wdtype = torch.float64 if self.ema[0].dtype == torch.float64 else torch.float32
            self._weight = torch.zeros((), dtype=wdtype, device=self.device)
        self._weight.fill_(weight)
        if self._compiled is None:
            logger.info(
                "hf-ema: compiling the fused %s->%s EMA update for %d tensors (%d elements), once",
                self.live[0].dtype,
                self.ema[0].dtype,
                len(self.ema),
                self.numel,
            )
            self._compiled = _fresh_compiled_lerp()
            try:
                # Compilation happens before any store, so a failure leaves the EMA untouched.
                self._compiled(self.ema, self.live, self._weight)
            except Exception as err:  # no compiler, unsupported platform, inductor bug: stay correct, just slower
                logger.warning("hf-ema: compiling the EMA update failed (%s); using the eager chunked update", err)
                self._compiled = None
                self.backend = "chunked"
                self._chunked_call(weight)
            return
        self._compiled(self.ema, self.live, self._weight)

    # ------------------------------------------------------------------ chunked
    def _build_plan(self) -> None:
        chunk = self.chunk_numel
        scratch = torch.empty(chunk, dtype=self.ema[0].dtype, device=self.device)
        pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e, w in zip(self.ema, self.live):
            if e.is_contiguous() and w.is_contiguous():
                ef, wf = e.view(-1), w.view(-1)
                for start in range(0, ef.numel(), chunk):
                    pieces.append((ef[start : start + chunk], wf[start : start + chunk]))
            elif e.numel() <= chunk:
                pieces.append((e, w))
            else:
                # A large non-contiguous tensor (rare): upcast it whole at each step.
                self._oversized.append((e, w))
        # Pack pieces into batches that fill the scratch buffer: two multi-tensor calls per batch.
        plan: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
        batch_e: list[torch.Tensor] = []
        batch_w: list[torch.Tensor] = []
        batch_s: list[torch.Tensor] = []
        used = 0
        for e, w in pieces:
            n = e.numel()
            if used + n > chunk and batch_e:
                plan.append((batch_e, batch_w, batch_s))
                batch_e, batch_w, batch_s, used = [], [], [], 0
            batch_e.append(e)
            batch_w.append(w)
            batch_s.append(scratch[used : used + n].view(e.shape))
            used += n
        if batch_e:
            plan.append((batch_e, batch_w, batch_s))
        self._plan = plan

    def _chunked_call(self, weight: float) -> None:
        if self._plan is None:
            self._build_plan()
        assert self._plan is not None  # built just above
        for ema, live, scratch in self._plan:
            foreach_copy_(scratch, live)
            foreach_lerp_(ema, scratch, weight)
        for e, w in self._oversized:
            e.lerp_(w.to(e.dtype), weight)

    def __repr__(self) -> str:
        dtypes = f"{self.live[0].dtype}->{self.ema[0].dtype}" if self.ema else "empty"
        return (
            f"{type(self).__name__}(backend={self.backend!r}, tensors={len(self.ema)}, numel={self.numel}, {dtypes})"
        )


def lerp_(ema: list[torch.Tensor], live: list[torch.Tensor], weight: float) -> None:
    """`ema += weight * (live - ema)` in place, for every pair, with an eager multi-tensor pass.

    `ema` and `live` are lists of tensors on one device; `live` may have a lower precision than `ema` (bf16 weights,
    fp32 EMA): it is then upcast a chunk at a time into a small scratch buffer, never as a full fp32 copy. For an
    update repeated every step, build a [`LerpKernel`] once instead (it also picks the compiled kernel).

    Args:
        ema (`list[torch.Tensor]`): The EMA tensors, updated in place.
        live (`list[torch.Tensor]`): The current weights, same shapes.
        weight (`float`): `1 - beta`.
    """
    if not ema:
        return
    if ema[0].dtype == live[0].dtype:
        foreach_lerp_(ema, live, weight)
    else:
        LerpKernel(ema, live, backend="chunked")(weight)


def copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """`dst[i].copy_(src[i])` for every pair in one multi-tensor pass (dtype conversion included).

    Args:
        dst (`list[torch.Tensor]`): Destination tensors.
        src (`list[torch.Tensor]`): Source tensors, same shapes.
    """
    if dst:
        foreach_copy_(dst, src)

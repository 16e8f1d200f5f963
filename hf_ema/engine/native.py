"""A native CPU kernel for the mixed-precision update (bf16/fp16 weights, fp32 EMA), built at first use.

`torch._foreach_lerp_` needs equal dtypes, and the `torch.compile`d fused kernel runs one OpenMP parallel region per
tensor (a few hundred fork/join barriers per update for an LLM) after a compile of seconds to tens of seconds. This
module compiles a 60-line C file with the system C compiler (`$CC`, else `cc`, `gcc` or `clang`; well under a
second) into a shared library in a temporary folder, loads it with `ctypes` and deletes the folder. The kernel
makes one parallel region over the whole group, on `torch.get_num_threads()` threads of the OpenMP runtime torch
already loaded, and upcasts each weight in registers: it reads the weights and reads and writes the EMA once, as
the fused kernel does, and nothing else. It computes `ema + w * (x - ema)` in fp32, as the fused kernel does.

[`LerpKernel`] picks it for CPU groups of bf16/fp16 weights and an fp32 EMA, and falls back to the fused or the
chunked kernel, with a warning, when no compiler is there or the build fails.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["NativeLerp", "NativeBuildError", "compiler", "load_library"]

logger = logging.getLogger(__name__)

#: Work item size in elements: big enough that the per-item overhead vanishes, small enough to balance the threads.
CHUNK_NUMEL = 1 << 16

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE half to float, exact for every input (normal, subnormal, zero, inf, nan), branch-free after if-conversion. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    const float magic = 0x1p-14f;
    uint32_t o = (uint32_t)(h & 0x7fff) << 13;
    uint32_t exp = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23;
    } else if (exp == 0) {
        float f;
        o += 1u << 23;
        memcpy(&f, &o, 4);
        f -= magic;
        memcpy(&o, &f, 4);
    }
    o |= (uint32_t)(h & 0x8000) << 16;
    float out;
    memcpy(&out, &o, 4);
    return out;
}

#define HF_EMA_LERP(NAME, CONVERT)                                                                    \
    void NAME(int64_t n_items, float **ema, const uint16_t **live, const int64_t *len, float weight, \
              int threads) {                                                                          \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t c = 0; c < n_items; ++c) {                                                       \
            float *restrict e = ema[c];                                                               \
            const uint16_t *restrict x = live[c];                                                     \
            const int64_t n = len[c];                                                                 \
            _Pragma("omp simd")                                                                       \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                const float ei = e[i];                                                                \
                e[i] = ei + weight * (CONVERT(x[i]) - ei);                                            \
            }                                                                                         \
        }                                                                                             \
    }

HF_EMA_LERP(hf_ema_lerp_bf16, bf16_to_f32)
HF_EMA_LERP(hf_ema_lerp_f16, f16_to_f32)
"""

_FUNCTIONS = {torch.bfloat16: "hf_ema_lerp_bf16", torch.float16: "hf_ema_lerp_f16"}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None


class NativeBuildError(RuntimeError):
    """The native kernel could not be built or loaded here (no compiler, no OpenMP, an unsupported platform)."""


def compiler() -> str | None:
    """The C compiler the kernel is built with: `$CC` when set, else the first of `cc`, `gcc`, `clang` on the
    `PATH`; `None` when there is none."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _build(out_dir: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")
    src = out_dir / "hf_ema_lerp.c"
    src.write_text(_SOURCE)
    lib = out_dir / "hf_ema_lerp.so"
    base = [cc, "-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)]
    errors = []
    # -march=native vectorises for this CPU (the library never leaves this process); some compilers lack it.
    for extra in (["-march=native"], []):
        try:
            proc = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeBuildError(f"running {cc} failed: {err}") from err
        if proc.returncode == 0:
            return lib
        errors.append(proc.stderr.strip()[-500:])
    raise NativeBuildError(f"{cc} could not build the kernel: {errors[-1]}")


def load_library() -> ctypes.CDLL:
    """Build and load the kernel library once per process (thread-safe); later calls return it at once.

    Raises:
        `NativeBuildError`: when it cannot be built or loaded; the error is remembered, so a failing build is
        tried once only.
    """
    global _library, _error
    with _lock:
        if _library is not None:
            return _library
        if _error is not None:
            raise NativeBuildError(_error)
        try:
            with tempfile.TemporaryDirectory(prefix="hf_ema_native_") as tmp:
                lib = ctypes.CDLL(str(_build(Path(tmp))))  # the mapping outlives the deleted file
            for name in _FUNCTIONS.values():
                fn = getattr(lib, name)
                fn.restype = None
                fn.argtypes = [
                    ctypes.c_int64,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_float,
                    ctypes.c_int,
                ]
        except NativeBuildError as err:
            _error = str(err)
            raise
        except OSError as err:  # dlopen failure
            _error = f"loading the kernel failed: {err}"
            raise NativeBuildError(_error) from err
        _library = lib
        return lib


class NativeLerp:
    """`ema[i] += weight * (live[i] - ema[i])` for contiguous CPU tensors: bf16 or fp16 `live`, fp32 `ema`.

    The work list (pointers and lengths, in `CHUNK_NUMEL` pieces) is built once and rebuilt whenever a tensor's
    storage moved, so that the kernel never writes through a stale pointer.

    Args:
        ema (`list[torch.Tensor]`): Contiguous fp32 CPU tensors, updated in place.
        live (`list[torch.Tensor]`): Contiguous CPU tensors of one dtype (bf16 or fp16), same shapes.

    Raises:
        `NativeBuildError`: when the kernel cannot be built here.
        `ValueError`: for tensors it does not handle.
    """

    def __init__(self, ema: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        if not ema:
            raise ValueError("`ema` must hold at least one tensor")
        dtype = live[0].dtype
        if dtype not in _FUNCTIONS:
            raise ValueError(f"`live` must be bfloat16 or float16, got {dtype}")
        for e, w in zip(ema, live):
            if (
                e.dtype != torch.float32
                or w.dtype != dtype
                or e.device.type != "cpu"
                or w.device.type != "cpu"
                or not e.is_contiguous()
                or not w.is_contiguous()
                or e.shape != w.shape
            ):
                raise ValueError(
                    f"the native kernel needs contiguous CPU tensors (fp32 EMA, {dtype} weights) of equal shapes, "
                    f"got {e.dtype} {tuple(e.shape)} on {e.device} and {w.dtype} {tuple(w.shape)} on {w.device}"
                )
        self.ema, self.live = ema, live
        self._fn = getattr(load_library(), _FUNCTIONS[dtype])
        self._ptrs: list[int] | None = None
        self._args: tuple | None = None

    def _current_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.ema] + [t.data_ptr() for t in self.live]

    def _plan(self, ptrs: list[int]) -> None:
        n = len(self.ema)
        ema_ptrs, live_ptrs, lens = [], [], []
        for e_ptr, w_ptr, t in zip(ptrs[:n], ptrs[n:], self.ema):
            numel = t.numel()
            for start in range(0, numel, CHUNK_NUMEL):
                ema_ptrs.append(e_ptr + 4 * start)
                live_ptrs.append(w_ptr + 2 * start)
                lens.append(min(CHUNK_NUMEL, numel - start))
        k = len(lens)
        self._args = (
            k,
            (ctypes.c_void_p * k)(*ema_ptrs),
            (ctypes.c_void_p * k)(*live_ptrs),
            (ctypes.c_int64 * k)(*lens),
        )
        self._ptrs = ptrs

    def __call__(self, weight: float) -> None:
        """Fold the weights into the EMA.

        Args:
            weight (`float`): The interpolation weight, `1 - beta`.
        """
        ptrs = self._current_ptrs()
        if ptrs != self._ptrs:
            self._plan(ptrs)
        k, ema_ptrs, live_ptrs, lens = self._args
        self._fn(k, ema_ptrs, live_ptrs, lens, float(weight), max(1, torch.get_num_threads()))

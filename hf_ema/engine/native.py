"""A native CPU kernel for the update of an fp32 EMA (bf16/fp16 weights, and fp32 weights with the NaN check), built
at first use.

`torch._foreach_lerp_` needs equal dtypes, and the `torch.compile`d fused kernel runs one OpenMP parallel region per
tensor (a few hundred fork/join barriers per update for an LLM) after a compile of seconds to tens of seconds. This
module compiles a short C file with the system C compiler (`$CC`, else `cc`, `gcc` or `clang`; well under a
second) into a shared library in a temporary folder, loads it with `ctypes` and deletes the folder. The kernel
makes one parallel region over the whole group, on `torch.get_num_threads()` threads of the OpenMP runtime torch
already loaded, and upcasts each weight in registers: it reads the weights and reads and writes the EMA once, as
the fused kernel does, and nothing else. It computes `ema + w * (x - ema)` in fp32, as the fused kernel does.

It also carries the non-finite check of `EMAConfig(on_nonfinite=...)` fused into the update (`fold_checked`): the
loop that folds the weights in also tests their exponent bits, so the check adds no memory traffic (a separate pass
over the weights would add a fifth to a third to the update's). That is why, with the check on, [`LerpKernel`] also
picks this kernel for fp32 weights on the CPU.

[`LerpKernel`] picks it for CPU groups of bf16/fp16 weights and an fp32 EMA (and fp32 weights when the check is on),
and falls back to the fused or the chunked kernel, with a warning, when no compiler is there or the build fails.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..utils.toolchain import c_compiler as compiler

__all__ = ["NativeLerp", "NativeBuildError", "compiler", "load_library"]

logger = logging.getLogger(__name__)

#: Work item size in elements: big enough that the per-item overhead vanishes, small enough to balance the threads.
CHUNK_NUMEL = 1 << 16

_SOURCE = r"""
#include <math.h>
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

static inline float f32_to_f32(float x) { return x; }

/* The value e with e + w * (x - e) == e1 (the update as the kernels compute it, in fp32 without contraction): the
   estimate (e1 - w x) / (1 - w) in double, then whichever of it and its two fp32 neighbours the update maps to e1,
   the closest to the estimate (e1 itself where x is not finite: never updated). Exact for most elements; where the update lost low bits of e (two values map to e1,
   or |e| is far below |w x|) it is within the rounding error of the update itself. */
static float unlerp_one(float e1, float x, float w) {
    if (!isfinite(x)) return e1; /* lerp_checked left it as it was */
    const double est = ((double)e1 - (double)w * (double)x) / (1.0 - (double)w);
    const float mid = (float)est;
    const float cands[3] = {mid, nextafterf(mid, -INFINITY), nextafterf(mid, INFINITY)};
    float best = mid;
    double best_dist = INFINITY;
    for (int k = 0; k < 3; ++k) {
        const float c = cands[k];
        if (c + w * (x - c) == e1 && fabs((double)c - est) < best_dist) {
            best = c;
            best_dist = fabs((double)c - est);
        }
    }
    return best;
}

/* Elements between two looks at the non-finite flag of the fused check: the threads stop at most this far past
   a non-finite weight (the rest of the update is not written, and what was written is undone). */
#define HF_EMA_BLOCK 4096

/* For each weight format: T the stored type, B the unsigned integer of the same width, EXP the exponent mask (all
   ones: inf or nan), CONVERT the upcast to float.
   - lerp: the update, unchecked.
   - lerp_checked: the update with the non-finite check fused into the same loop (an OR over the exponent bits; an
     element whose weight is non-finite keeps its value), so it moves exactly the bytes of lerp. At the end of the
     first block holding a non-finite weight every thread stops, and the function returns its item (n_items when
     all were finite). done[c] = elements of item c written.
   - unlerp: undo the update of the first count[c] elements of each item (unlerp_one).
   - check: read-only, the first item holding a non-finite weight (n_items when none). */
#define HF_EMA_KERNELS(SUFFIX, T, B, EXP, CONVERT)                                                              \
    static inline int nonfinite_##SUFFIX(const B *restrict bits, int64_t n) {                                  \
        B acc = 0;                                                                                              \
        _Pragma("omp simd reduction(|:acc)")                                                                    \
        for (int64_t i = 0; i < n; ++i) acc |= (B)((bits[i] & (B)EXP) == (B)EXP);                               \
        return acc != 0;                                                                                        \
    }                                                                                                           \
    void hf_ema_lerp_##SUFFIX(int64_t n_items, float **ema, const T **live, const int64_t *len, float weight,   \
                              int threads) {                                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                       \
        for (int64_t c = 0; c < n_items; ++c) {                                                                 \
            float *restrict e = ema[c];                                                                         \
            const T *restrict x = live[c];                                                                      \
            const int64_t n = len[c];                                                                           \
            _Pragma("omp simd")                                                                                 \
            for (int64_t i = 0; i < n; ++i) {                                                                   \
                const float ei = e[i];                                                                          \
                e[i] = ei + weight * (CONVERT(x[i]) - ei);                                                      \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    int64_t hf_ema_lerp_checked_##SUFFIX(int64_t n_items, float **ema, const T **live, const int64_t *len,     \
                                         float weight, int threads, int64_t *done) {                           \
        int stop = 0;                                                                                           \
        int64_t first = n_items;                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(min:first)")                  \
        for (int64_t c = 0; c < n_items; ++c) {                                                                 \
            done[c] = 0;                                                                                        \
            if (__atomic_load_n(&stop, __ATOMIC_RELAXED)) continue;                                             \
            float *restrict e = ema[c];                                                                         \
            const T *restrict x = live[c];                                                                      \
            const B *bits = (const B *)live[c];                                                                 \
            const int64_t n = len[c];                                                                           \
            for (int64_t s = 0; s < n; s += HF_EMA_BLOCK) {                                                     \
                const int64_t end = s + HF_EMA_BLOCK < n ? s + HF_EMA_BLOCK : n;                                \
                B acc = 0;                                                                                      \
                _Pragma("omp simd reduction(|:acc)")                                                            \
                for (int64_t i = s; i < end; ++i) {                                                             \
                    const B bad = (B)((bits[i] & (B)EXP) == (B)EXP);                                            \
                    const float ei = e[i];                                                                      \
                    const float updated = ei + weight * (CONVERT(x[i]) - ei);                                   \
                    acc |= bad;                                                                                 \
                    e[i] = bad ? ei : updated;                                                                  \
                }                                                                                               \
                done[c] = end;                                                                                  \
                if (acc) {                                                                                      \
                    if (c < first) first = c;                                                                   \
                    __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);                                               \
                    break;                                                                                      \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        return first;                                                                                           \
    }                                                                                                           \
    void hf_ema_unlerp_##SUFFIX(int64_t n_items, float **ema, const T **live, const int64_t *count,            \
                                float weight, int threads) {                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                       \
        for (int64_t c = 0; c < n_items; ++c) {                                                                 \
            float *restrict e = ema[c];                                                                         \
            const T *restrict x = live[c];                                                                      \
            const int64_t n = count[c];                                                                         \
            for (int64_t i = 0; i < n; ++i) e[i] = unlerp_one(e[i], CONVERT(x[i]), weight);                     \
        }                                                                                                       \
    }                                                                                                           \
    int64_t hf_ema_check_##SUFFIX(int64_t n_items, const T **live, const int64_t *len, int threads) {         \
        int stop = 0;                                                                                           \
        int64_t first = n_items;                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(min:first)")                  \
        for (int64_t c = 0; c < n_items; ++c) {                                                                 \
            if (__atomic_load_n(&stop, __ATOMIC_RELAXED)) continue;                                             \
            if (nonfinite_##SUFFIX((const B *)live[c], len[c])) {                                               \
                if (c < first) first = c;                                                                       \
                __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);                                                   \
            }                                                                                                   \
        }                                                                                                       \
        return first;                                                                                           \
    }

HF_EMA_KERNELS(bf16, uint16_t, uint16_t, 0x7f80u, bf16_to_f32)
HF_EMA_KERNELS(f16, uint16_t, uint16_t, 0x7c00u, f16_to_f32)
HF_EMA_KERNELS(f32, float, uint32_t, 0x7f800000u, f32_to_f32)
"""

#: The kernels' name suffix per weight dtype.
_SUFFIXES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
#: name prefix -> (restype, argtypes)
_SIGNATURES = {
    "hf_ema_lerp_": (None, [_I64, _P, _P, _P, _F, _INT]),
    "hf_ema_lerp_checked_": (_I64, [_I64, _P, _P, _P, _F, _INT, _P]),
    "hf_ema_unlerp_": (None, [_I64, _P, _P, _P, _F, _INT]),
    "hf_ema_check_": (_I64, [_I64, _P, _P, _INT]),
}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None


class NativeBuildError(RuntimeError):
    """The native kernel could not be built or loaded here (no compiler, no OpenMP, an unsupported platform)."""


def _build(out_dir: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")
    src = out_dir / "hf_ema_lerp.c"
    src.write_text(_SOURCE)
    lib = out_dir / "hf_ema_lerp.so"
    # -ffp-contract=off: no FMA, so that the update is the same expression in every loop and its undo can replay it.
    base = [
        cc,
        "-O3",
        "-std=c11",
        "-ffp-contract=off",
        "-fopenmp",
        "-shared",
        "-fPIC",
        str(src),
        "-o",
        str(lib),
        "-lm",
    ]
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
            for prefix, (restype, argtypes) in _SIGNATURES.items():
                for suffix in _SUFFIXES.values():
                    fn = getattr(lib, prefix + suffix)
                    fn.restype = restype
                    fn.argtypes = argtypes
        except NativeBuildError as err:
            _error = str(err)
            raise
        except OSError as err:  # dlopen failure
            _error = f"loading the kernel failed: {err}"
            raise NativeBuildError(_error) from err
        _library = lib
        return lib


class NativeLerp:
    """`ema[i] += weight * (live[i] - ema[i])` for contiguous CPU tensors: bf16, fp16 or fp32 `live`, fp32 `ema`.

    The work list (pointers and lengths, in `CHUNK_NUMEL` pieces) is built once and rebuilt whenever a tensor's
    storage moved, so that the kernel never writes through a stale pointer.

    Besides the plain update (`__call__`), the kernel has the non-finite check fused in (`fold_checked`): the loop
    that folds the weights in also tests them for NaN/inf (an element whose weight is not finite keeps its value),
    so the check adds no memory traffic. At the end of the first block of 4096 holding a non-finite weight every
    thread stops, and what was folded in is undone (`e = (e' - w x) / (1 - w)`, in double: see `fold_checked`).

    Args:
        ema (`list[torch.Tensor]`): Contiguous fp32 CPU tensors, updated in place.
        live (`list[torch.Tensor]`): Contiguous CPU tensors of one dtype (bf16, fp16 or fp32), same shapes.

    Raises:
        `NativeBuildError`: when the kernel cannot be built here.
        `ValueError`: for tensors it does not handle.
    """

    def __init__(self, ema: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        if not ema:
            raise ValueError("`ema` must hold at least one tensor")
        dtype = live[0].dtype
        if dtype not in _SUFFIXES:
            raise ValueError(f"`live` must be bfloat16, float16 or float32, got {dtype}")
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
        self._itemsize = live[0].element_size()
        lib, suffix = load_library(), _SUFFIXES[dtype]
        self._fn = getattr(lib, "hf_ema_lerp_" + suffix)
        self._checked = getattr(lib, "hf_ema_lerp_checked_" + suffix)
        self._unlerp = getattr(lib, "hf_ema_unlerp_" + suffix)
        self._check = getattr(lib, "hf_ema_check_" + suffix)
        self._ptrs: list[int] | None = None
        self._args: tuple | None = None
        self._done: ctypes.Array | None = None

    def _current_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.ema] + [t.data_ptr() for t in self.live]

    def _plan(self, ptrs: list[int]) -> None:
        n = len(self.ema)
        ema_ptrs, live_ptrs, lens = [], [], []
        for e_ptr, w_ptr, t in zip(ptrs[:n], ptrs[n:], self.ema):
            numel = t.numel()
            for start in range(0, numel, CHUNK_NUMEL):
                ema_ptrs.append(e_ptr + 4 * start)
                live_ptrs.append(w_ptr + self._itemsize * start)
                lens.append(min(CHUNK_NUMEL, numel - start))
        k = len(lens)
        self._args = (
            k,
            (ctypes.c_void_p * k)(*ema_ptrs),
            (ctypes.c_void_p * k)(*live_ptrs),
            (ctypes.c_int64 * k)(*lens),
        )
        self._done = (ctypes.c_int64 * k)()
        self._ptrs = ptrs

    def _work(self) -> tuple:
        ptrs = self._current_ptrs()
        if ptrs != self._ptrs:
            self._plan(ptrs)
        assert self._args is not None  # planned just above
        return self._args

    @staticmethod
    def _threads() -> int:
        return max(1, torch.get_num_threads())

    def __call__(self, weight: float) -> None:
        """Fold the weights into the EMA.

        Args:
            weight (`float`): The interpolation weight, `1 - beta`.
        """
        k, ema_ptrs, live_ptrs, lens = self._work()
        self._fn(k, ema_ptrs, live_ptrs, lens, float(weight), self._threads())

    def fold_checked(self, weight: float) -> bool:
        """Fold the weights into the EMA unless one of them is NaN or inf.

        When one is, the EMA is left as it was: the blocks folded in before the check met it are undone in double
        precision, which restores most of their elements bit for bit and every one to within the rounding error of
        the update itself (the update may have rounded away low bits of a small EMA value); every other element is
        not written at all. Keep `weight` small (the undo divides by `1 - weight`; see `MAX_UNDO_WEIGHT`).

        Args:
            weight (`float`): The interpolation weight, `1 - beta`.

        Returns:
            `bool`: whether the weights were all finite (and folded in).
        """
        k, ema_ptrs, live_ptrs, lens = self._work()
        threads = self._threads()
        first = self._checked(k, ema_ptrs, live_ptrs, lens, float(weight), threads, self._done)
        if first == k:
            return True
        if self._done is not None and any(self._done):
            self._unlerp(k, ema_ptrs, live_ptrs, self._done, float(weight), threads)
        return False

    def undo(self, weight: float) -> None:
        """Undo a whole update made with `weight` (`weight < 1`), e.g. when another group or rank met a non-finite
        weight: `e = (e' - w x) / (1 - w)` in double, as in `fold_checked`.

        Args:
            weight (`float`): The interpolation weight of the update to undo.
        """
        k, ema_ptrs, live_ptrs, lens = self._work()
        self._unlerp(k, ema_ptrs, live_ptrs, lens, float(weight), self._threads())

    def all_finite(self) -> bool:
        """Whether every weight is finite (a read-only pass)."""
        k, _, live_ptrs, lens = self._work()
        return self._check(k, live_ptrs, lens, self._threads()) == k

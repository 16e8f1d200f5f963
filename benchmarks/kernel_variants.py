"""The candidate implementations of the mixed-precision update (bf16 weights -> fp32 EMA), side by side in one run:
the measurements behind `LerpKernel`'s automatic choice.

    python benchmarks/kernel_variants.py               # 50M Llama, bf16 weights
    python benchmarks/kernel_variants.py --dtype float16 --reps 9

Variants, all computing `ema += w * (weights - ema)` with an fp32 EMA (except the bf16-EMA reference row):
- `_foreach_mul_` + `_foreach_add_` with the bf16 operand (hf-ema's first version, and timm's fp32-EMA path);
- upcast each weight (`t.float()`, a fresh temporary each step) then `_foreach_lerp_`;
- one flat fp32 EMA buffer and one flat fp32 copy of the weights, then a single big `lerp_` (needs a full fp32
  copy of the weights: the memory the issue wants to avoid, measured for reference);
- chunked: upcast a chunk at a time into one reusable scratch buffer, then `_foreach_lerp_` (hf-ema's fallback);
- compiled: the `torch.compile`d fused kernel (one OpenMP region per tensor; hf-ema's choice for large groups
  when the native kernel cannot be built);
- native: hf-ema's C kernel built at first use (`hf_ema.engine.native`; one OpenMP region for the whole group), hf-ema's
  choice on CPU when a C compiler is there.
The calls take turns (one call each per repetition), medians reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anchors as A  # noqa: E402
from _docs_page import DocsPage, default_path  # noqa: E402

from hf_ema.engine.kernels import LerpKernel, compile_available  # noqa: E402
from hf_ema.engine.native import compiler  # noqa: E402

W = 1e-3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="50M")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--page", default=default_path("kernel_variants"), help="results page to write ('' for none)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = A.build_llama(args.size, dtype)
    live = [p.detach() for p in model.parameters()]
    n = sum(t.numel() for t in live)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")

    def fresh():
        return [t.float() for t in live]

    e_muladd, e_cast, e_low = fresh(), fresh(), [t.clone() for t in live]
    flat_ema = torch.cat([t.float().view(-1) for t in live])
    flat_w = torch.empty_like(flat_ema)
    flat_views = list(torch.split(flat_w, [t.numel() for t in live]))
    flat_views = [v.view(t.shape) for v, t in zip(flat_views, live)]

    def muladd():
        torch._foreach_mul_(e_muladd, 1 - W)
        torch._foreach_add_(e_muladd, live, alpha=W)

    def cast_lerp():
        torch._foreach_lerp_(e_cast, [t.float() for t in live], W)

    def flat():
        torch._foreach_copy_(flat_views, live)
        flat_ema.lerp_(flat_w, W)

    variants = {
        f"reference: {args.dtype} EMA, _foreach_lerp_": lambda: torch._foreach_lerp_(e_low, live, W),
        "_foreach_mul_ + _foreach_add_ (mixed)": muladd,
        "upcast per tensor + _foreach_lerp_": cast_lerp,
        "flat fp32 EMA + flat fp32 weight copy, one lerp_": flat,
    }
    for chunk in (1 << 16, 1 << 18, 1 << 20, 1 << 22):
        kernel = LerpKernel(fresh(), live, backend="chunked", chunk_numel=chunk)
        variants[f"chunked, scratch 2^{chunk.bit_length() - 1} elements"] = lambda k=kernel: k(W)
    first_call_s = {}  # build time of the kernels built at run time
    built = [("compiled", "compiled fused kernel (torch.compile)", compile_available("cpu"))]
    built.append(("native", "native kernel (hf_ema.engine.native)", compiler() is not None))
    for backend, label, available in built:
        if not available:
            continue
        kernel = LerpKernel(fresh(), live, backend=backend)
        t0 = time.perf_counter()
        kernel(W)
        first_call_s[backend] = time.perf_counter() - t0
        if kernel.backend == backend:  # else the build failed and it fell back: not this variant
            variants[label] = lambda k=kernel: k(W)
    for fn in variants.values():
        fn()
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times[next(iter(variants))])
    page = DocsPage(
        "kernel_variants",
        "Mixed-precision update kernels",
        intro=(
            "The candidate implementations of the mixed-precision update (bf16/fp16 weights into an fp32 EMA), timed "
            "side by side in one run (the calls take turns, medians reported): the measurements behind the kernel "
            "`ModelEMA` picks. The reference row keeps an EMA in the weights' dtype; every other row an fp32 EMA."
        ),
    )
    with page.capture():
        print(f"\n### mixed-precision update variants, {args.size} Llama ({n / 1e6:.1f}M), {args.dtype} weights\n")
        print("| variant | ms / update | vs reference |")
        print("|---|---:|---:|")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"| {name} | {t * 1e3:.1f} | {t / ref:.2f} |")
        if "compiled" in first_call_s:
            print(f"\nfirst call of the compiled kernel (compilation): {first_call_s['compiled']:.1f} s")
        if "native" in first_call_s:
            print(f"first call of the native kernel (build and load): {first_call_s['native']:.2f} s")
    page.write(args.page, argv)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()

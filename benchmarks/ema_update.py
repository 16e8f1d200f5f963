"""Time of one EMA update: hf-ema against the anchors, next to the memory-bandwidth floor, in one run.

    python benchmarks/ema_update.py                       # 50M and 500M parameters, fp32 and bf16 weights
    python benchmarks/ema_update.py --sizes 50M --reps 9  # quicker
    python benchmarks/ema_update.py --sizes 50M --only nan_check --reps 31 --rounds 5 --docs docs/guides/nan_guarantee.md

For each (size, weight dtype) the script builds a Llama from a config, builds every EMA implementation on it, and
times `update()`: the median of `--rounds` x `--reps` calls after two warm-up calls. When every EMA fits in memory
at once the implementations take turns call by call (else they are built, timed and freed in turn, round by
round), so that load from other processes hits them alike. Beside the wall-clock time, the process CPU time of the
same calls, which time-slicing by other processes does not inflate. The floor is the bytes an fp32-EMA update must
move (read the weights, read and write the fp32 EMA) over the memory bandwidth measured in the same run: the
faster of a 256 MiB copy and a 256 MiB in-place scale (read-modify-write, the EMA's own access pattern).

The ratio column divides by the fastest anchor: with fp32 weights any anchor; with low-precision weights the
fastest anchor that keeps an EMA in the weights' dtype (hf-ema keeps fp32, the goal is to cost no more than them).

The cost of the NaN check (`EMAConfig(on_nonfinite=...)`) is measured side by side in the same run: `ModelEMA` as
configured by default (`"skip"`: the check fused into the native kernel) against `on_nonfinite="ignore"` (no check,
the kernel hf-ema used before the check: `_foreach_lerp_` for fp32 weights), and, to isolate the check from the
choice of kernel, the native kernel's `fold_checked` against its plain update on the same tensors. The goal: the
checked update within 5% of the unchecked one. `--only nan_check` times these four alone; `--docs FILE` writes their
table into FILE between the `<!-- ema_update.py:nan-check -->` markers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anchors as A  # noqa: E402
from _docs_page import DocsPage, default_path  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The hf-ema rows of the NaN-check comparison (never anchors).
NAN_CHECK = ("hf_ema", "hf_ema_ignore", "kernel_checked", "kernel_unchecked")
OURS = set(NAN_CHECK)
#: Relative cost allowed for the NaN check.
NAN_CHECK_GOAL = 1.05
DOCS_BEGIN = "<!-- ema_update.py:nan-check:begin -->"
DOCS_END = "<!-- ema_update.py:nan-check:end -->"


def native_kernel(model, checked: bool) -> A.Impl:
    """The native kernel alone on an fp32 EMA of the model's parameters: `fold_checked` (the check fused in) or the
    plain update, so that the ratio of the two is the check's own cost."""
    from hf_ema.engine.kernels import LerpKernel

    live = [p.detach() for p in model.parameters()]
    ema = [p.float().clone() for p in live]
    kernel = LerpKernel(ema, live, backend="native", check_finite=checked)
    weight = 1.0 - A.DECAY
    update = (lambda: kernel.fold_checked(weight)) if checked else (lambda: kernel(weight))
    name = "native kernel, " + ("check fused (fold_checked)" if checked else "no check")
    return A.Impl(name, update, torch.float32, kernel, note="kernel: native")


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call. CPU time is not inflated when other processes take the cores
    (it still is by their use of the memory bus), so it is the steadier of the two on a shared machine."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


class CopyFloor:
    """Copy bandwidth: a 256 MiB fp32 buffer copied into another (read + write)."""

    def __init__(self):
        self.src = torch.randn(64 << 20)
        self.dst = torch.empty_like(self.src)

    def update(self):
        self.dst.copy_(self.src)

    @property
    def bytes(self) -> int:
        return 2 * self.src.numel() * 4


class InPlaceFloor(CopyFloor):
    """Read-modify-write bandwidth: a 256 MiB fp32 buffer scaled in place (the access pattern of the EMA itself)."""

    def update(self):
        self.src.mul_(1.0)


def builders(weight_dtype: torch.dtype, skip: set[str], only: set[str] | None = None):
    out = [
        ("hf_ema", A.hf_ema),
        ("hf_ema_ignore", lambda m: A.hf_ema(m, on_nonfinite="ignore")),
        ("kernel_checked", lambda m: native_kernel(m, True)),
        ("kernel_unchecked", lambda m: native_kernel(m, False)),
    ]
    out += [(k, v) for k, v in A.ANCHORS.items()]
    if weight_dtype != torch.float32:
        out += [(k, v) for k, v in A.FP32_EMA_ANCHORS.items()]
    return [(k, v) for k, v in out if k not in skip and (only is None or k in only)]


def bench_case(size: str, dtype_name: str, args) -> dict:
    dtype = DTYPES[dtype_name]
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    model = A.build_llama(size, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    w_bytes = torch.finfo(dtype).bits // 8
    todo = builders(dtype, set(args.skip), args.only)
    # Interleave everything when all EMA copies fit comfortably, else build / time / free one at a time per round.
    need = n_params * sum(4 if k in OURS | {"classic_fp32", "timm_v3_fp32"} else w_bytes for k, _ in todo)
    interleave = need < args.mem_fraction * mem_available_bytes()
    floor, floor_rmw = CopyFloor(), InPlaceFloor()
    samples: dict[str, list[float]] = {"floor": [], "floor_rmw": []}
    meta: dict[str, dict] = {}

    def build(key, builder):
        gc.collect()
        impl = A.safe_build(builder, model)
        if impl is None:
            meta[key] = {"name": key, "missing": True}
            return None
        t_first = timed(impl.update)[0]  # warm-up; hf-ema compiles its kernel here when it uses one
        t_second = timed(impl.update)[0]
        m = meta.setdefault(
            key,
            {
                "name": impl.name,
                "ema_dtype": str(impl.ema_dtype).removeprefix("torch."),
                "note": impl.note,
                "first_call_s": t_first,
            },
        )
        # Implementations far slower than the rest get one timed call per round: they are not close calls.
        m["reps"] = args.reps if t_second < args.slow_s else 1
        samples.setdefault(key, [])
        return impl

    live = {}
    if interleave:
        for key, builder in todo:
            live[key] = build(key, builder)
    floor.update()
    cpu: dict[str, list[float]] = {k: [] for k in samples}

    def record(key, impl, n):
        for _ in range(n):
            wall, proc = timed(impl.update)
            samples[key].append(wall)
            cpu.setdefault(key, []).append(proc)

    for _ in range(args.rounds):
        if interleave:
            # Round-robin, one call each: a burst of load from other processes hits every implementation alike.
            for rep in range(args.reps):
                record("floor", floor, 1)
                record("floor_rmw", floor_rmw, 1)
                for key, _ in todo:
                    if live[key] is not None and rep < meta[key]["reps"]:
                        record(key, live[key], 1)
        else:
            for key, builder in todo:
                record("floor", floor, 1)
                record("floor_rmw", floor_rmw, 1)
                impl = build(key, builder)
                if impl is not None:
                    record(key, impl, meta[key]["reps"])
                del impl
    live.clear()
    gc.collect()

    copy_bw = floor.bytes / statistics.median(samples["floor"])
    rmw_bw = floor_rmw.bytes / statistics.median(samples["floor_rmw"])
    # The faster probe: the floor must be a time no correct update can beat.
    bandwidth = max(copy_bw, rmw_bw)
    floor_bytes = n_params * (w_bytes + 8)
    floor_s = floor_bytes / bandwidth
    rows = []
    for key, _ in todo:
        m = meta[key]
        if m.get("missing"):
            rows.append({"key": key, "name": key, "missing": True})
            continue
        t = statistics.median(samples[key])
        c = statistics.median(cpu[key])
        rows.append(
            {
                "key": key,
                **m,
                "ms": t * 1e3,
                "min_ms": min(samples[key]) * 1e3,
                "cpu_ms": c * 1e3,
                "x_floor": t / floor_s,
                "n": len(samples[key]),
            }
        )
    anchors = [r for r in rows if not r.get("missing") and r["key"] not in OURS]
    if dtype == torch.float32:
        ref = [r for r in anchors]
        ref_label = "fastest anchor"
    else:
        ref = [r for r in anchors if r["ema_dtype"] == dtype_name]
        ref_label = f"fastest anchor with a {dtype_name} EMA"
    best = min(ref, key=lambda r: r["ms"]) if ref else None
    best_cpu = min(ref, key=lambda r: r["cpu_ms"]) if ref else None
    best_min = min(ref, key=lambda r: r["min_ms"]) if ref else None
    for r in rows:
        if not r.get("missing") and best is not None:
            r["ratio"] = r["ms"] / best["ms"]
            r["cpu_ratio"] = r["cpu_ms"] / best_cpu["cpu_ms"]
            r["min_ratio"] = r["min_ms"] / best_min["min_ms"]
    # What it would take, from this run's own figures: to cost no more than the reference, an fp32 EMA update
    # must move its bytes (10 per parameter for bf16 weights) at (its bytes / the reference's time). Set beside the
    # bandwidth the probes reached, that tells whether any fp32 EMA could have met the goal in this run. Even an
    # fp32 EMA kept as two 16-bit planes, high halves written back only when they change, moves 8 bytes.
    bound = None
    if best is not None:
        hf = next((r for r in rows if r["key"] == "hf_ema" and not r.get("missing")), None)
        bound = {
            # A same-dtype EMA reads the weights, reads and writes the EMA: 3 x the weights' bytes.
            "reference_GBps": n_params * 3 * w_bytes / best["ms"] / 1e6,
            "needed_GBps": floor_bytes / best["ms"] / 1e6,
            "needed_split_GBps": n_params * (w_bytes + 6) / best["ms"] / 1e6,
            "hf_ema_GBps": floor_bytes / hf["ms"] / 1e6 if hf is not None else None,
            "probe_GBps": bandwidth / 1e9,
        }
    by_key = {r["key"]: r for r in rows if not r.get("missing")}
    nan_check = {}
    for label, (checked, plain) in {"model": ("hf_ema", "hf_ema_ignore"), "kernel": NAN_CHECK[2:]}.items():
        if checked in by_key and plain in by_key:
            a, b = by_key[checked], by_key[plain]
            nan_check[label] = {
                "checked_ms": a["ms"],
                "plain_ms": b["ms"],
                "ratio": a["ms"] / b["ms"],
                "min_ratio": a["min_ms"] / b["min_ms"],
                "cpu_ratio": a["cpu_ms"] / b["cpu_ms"],
                "checked_note": a.get("note", ""),
                "plain_note": b.get("note", ""),
            }
    return {
        "load": load,
        "nan_check": nan_check,
        "bound": bound,
        "size": size,
        "weights": dtype_name,
        "params": n_params,
        "copy_GBps": copy_bw / 1e9,
        "rmw_GBps": rmw_bw / 1e9,
        "floor_ms": floor_s * 1e3,
        "interleaved": interleave,
        "reference": f"{ref_label}: {best['name']}" if best else None,
        "rows": rows,
        "threads": torch.get_num_threads(),
    }


PAGE_INTRO = """For each Llama size and weight dtype, every EMA implementation is built on the same model and one `update()`
is timed: the median of the timed calls after two warm-up calls, the implementations taking turns call by call
(so that load from other processes hits them alike), with the process CPU time of the same calls beside it. The
floor is the bytes an fp32-EMA update must move (read the weights, read and write the fp32 EMA) over the faster of
a 256 MiB copy and a 256 MiB in-place scale measured in the same run. `ratio` divides by the fastest other library:
with fp32 weights any of them; with bf16 weights the fastest one that keeps a bf16 EMA (hf-ema keeps fp32, the
goal is to cost no more than them). Each library is configured the way its documentation shows, at its fastest
documented setting; timm is installed with `pip install --no-deps timm` and its self-contained
`timm/utils/model_ema.py` loaded by file path (its package imports torchvision, which would pull a CUDA torch)."""


def print_case(res: dict) -> None:
    print(
        f"\n### {res['size']} Llama ({res['params'] / 1e6:.1f}M parameters), {res['weights']} weights, "
        f"{res['threads']} threads, " + ("calls interleaved" if res["interleaved"] else "built and timed in turn")
    )
    print(
        f"bandwidth: copy {res['copy_GBps']:.1f} GB/s, in-place {res['rmw_GBps']:.1f} GB/s; "
        f"floor (read weights + read/write fp32 EMA, at the faster of the two) "
        f"{res['floor_ms']:.1f} ms; ratio vs {res['reference']}\n"
    )
    print(
        "| implementation | EMA dtype | median ms | x floor | ratio | min ms | min ratio | CPU ms | CPU ratio | calls "
        "| note |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        if r.get("missing"):
            print(f"| {r['name']} | - | not installed | | | | | | | | |")
            continue
        note = r.get("note", "")
        if "compiled" in note:
            note += f"; first call (compiles) {r['first_call_s']:.1f} s"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        cpu_ratio = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
        print(
            f"| {r['name']} | {r['ema_dtype']} | {r['ms']:.1f} | {r['x_floor']:.2f} | {ratio} | {r['min_ms']:.1f} | "
            f"{r.get('min_ratio', 0):.2f} | {r['cpu_ms']:.1f} | {cpu_ratio} | {r['n']} | {note} |"
        )
    for label, c in res.get("nan_check", {}).items():
        what = "ModelEMA default vs on_nonfinite='ignore'" if label == "model" else "native kernel, checked vs plain"
        verdict = "met" if c["ratio"] <= NAN_CHECK_GOAL else "NOT met"
        print(
            f"\nNaN check, {what}: {c['checked_ms']:.1f} vs {c['plain_ms']:.1f} ms, ratio {c['ratio']:.3f} "
            f"(min {c['min_ratio']:.3f}, CPU {c['cpu_ratio']:.3f}); goal <= {NAN_CHECK_GOAL:.2f}: {verdict}"
        )
    hf = next((r for r in res["rows"] if r["key"] == "hf_ema"), {})
    if "ratio" in hf:
        verdict = "met" if hf["ratio"] <= 1.0 else "NOT met"
        print(
            f"\ngoal (hf-ema fp32 EMA, median wall-clock ratio <= 1.00): {verdict} ({hf['ratio']:.2f}; "
            f"min ratio {hf['min_ratio']:.2f}, CPU-time ratio {hf['cpu_ratio']:.2f})"
        )
    bound = res.get("bound")
    if bound is not None and res["weights"] != "float32":
        print(
            f"what the goal takes in this run: the fastest {res['weights']}-EMA anchor moved its 3 x 2 bytes per "
            f"parameter at {bound['reference_GBps']:.1f} GB/s; to match its time an fp32 EMA must move 10 bytes per parameter "
            f"at {bound['needed_GBps']:.1f} GB/s (8 bytes, with the EMA kept as two 16-bit planes: "
            f"{bound['needed_split_GBps']:.1f} GB/s); hf-ema moved them at {bound['hf_ema_GBps']:.1f} GB/s; the "
            f"fastest bandwidth probe reached {bound['probe_GBps']:.1f} GB/s"
        )


def nan_check_table(results: list[dict], argv: list[str]) -> str:
    """The NaN-check rows of a run as a markdown table, with the command that made it."""
    lines = [
        f"`python benchmarks/ema_update.py {' '.join(argv)}` (torch {torch.__version__}, "
        f"{results[0]['threads'] if results else '?'} threads, load average {results[0]['load'] if results else 0:.1f} "
        "at the start; median of the timed calls, interleaved; copy bandwidth as the same run measured it):",
        "",
        '| model | weights | copy GB/s | kernels (default / ignore) | ModelEMA, default (`skip`) ms | `on_nonfinite="ignore"` ms | ratio | min ratio | CPU ratio '
        "| native kernel, check fused ms | same kernel, no check ms | ratio | min ratio | CPU ratio |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        m, k = res["nan_check"].get("model"), res["nan_check"].get("kernel")
        cells = [f"{res['size']} Llama ({res['params'] / 1e6:.1f}M)", res["weights"], f"{res['copy_GBps']:.1f}"]
        kernels = [c[key].removeprefix("kernel: ") for c in (m,) if c for key in ("checked_note", "plain_note")]
        cells.append(" / ".join(kernels) or "-")
        for c in (m, k):
            if c is None:
                cells += ["-"] * 5
            else:
                cells += [f"{c['checked_ms']:.1f}", f"{c['plain_ms']:.1f}", f"{c['ratio']:.3f}"]
                cells += [f"{c['min_ratio']:.3f}", f"{c['cpu_ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(path: str, results: list[dict], argv: list[str]) -> None:
    """Replace the text between the NaN-check markers of `path` with this run's table."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"ema_update.py: error: {path!r} lacks the markers {DOCS_BEGIN} ... {DOCS_END}")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{DOCS_BEGIN}\n{nan_check_table(results, argv)}\n{DOCS_END}{tail}")
    print(f"wrote the NaN-check table into {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50M,500M", help="comma-separated keys of LLAMA_SIZES")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per implementation per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--mem-fraction", type=float, default=0.5, help="interleave call by call when all EMAs fit in this much"
    )
    parser.add_argument("--slow-s", type=float, default=2.0, help="one call per round above this many seconds")
    parser.add_argument("--skip", default="", help="comma-separated implementation keys to leave out")
    parser.add_argument(
        "--only", default=None, help="comma-separated implementation keys to run alone; 'nan_check' for the check's"
    )
    parser.add_argument("--docs", default=None, help="write the NaN-check table into this markdown file")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--page",
        default=None,
        help="results page to write ('' for none; default: docs/benchmarks/ema_update.md, none with --only)",
    )
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    if args.only is not None:
        keys = set()
        for key in args.only.split(","):
            keys |= set(NAN_CHECK) if key == "nan_check" else {key}
        args.only = keys
    if args.docs is not None and not os.path.isfile(args.docs):
        parser.error(f"--docs: no such file: {args.docs!r}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    results = []
    page = DocsPage(
        "ema_update",
        "One EMA update against the other EMA libraries",
        intro=PAGE_INTRO,
    )
    for size in args.sizes.split(","):
        for dtype_name in args.dtypes.split(","):
            res = bench_case(size, dtype_name, args)
            with page.capture():
                print_case(res)
            results.append(res)
            sys.stdout.flush()
    print(f"\nload average at the end {os.getloadavg()}")
    # A run of a subset (`--only`) is not the page's full comparison: no page unless asked for.
    page.write(args.page if args.page is not None else (None if args.only else default_path("ema_update")), argv)
    if args.docs:
        write_docs(args.docs, results, argv if argv is not None else sys.argv[1:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

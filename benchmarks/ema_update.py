"""Time of one EMA update: hf-ema against the anchors, next to the memory-bandwidth floor, in one run.

    python benchmarks/ema_update.py                       # 50M and 500M parameters, fp32 and bf16 weights
    python benchmarks/ema_update.py --sizes 50M --reps 9  # quicker

For each (size, weight dtype) the script builds a Llama from a config, builds every EMA implementation on it, and
times `update()`: the median of `--rounds` x `--reps` calls after two warm-up calls. When every EMA fits in memory
at once the implementations take turns call by call (else they are built, timed and freed in turn, round by
round), so that load from other processes hits them alike. Beside the wall-clock time, the process CPU time of the
same calls, which time-slicing by other processes does not inflate. The floor is the bytes an fp32-EMA update must
move (read the weights, read and write the fp32 EMA) over the memory bandwidth measured in the same run: the
faster of a 256 MiB copy and a 256 MiB in-place scale (read-modify-write, the EMA's own access pattern).

The ratio column divides by the fastest anchor: with fp32 weights any anchor; with low-precision weights the
fastest anchor that keeps an EMA in the weights' dtype (hf-ema keeps fp32, the goal is to cost no more than them).
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def builders(weight_dtype: torch.dtype, skip: set[str]):
    out = [("hf_ema", A.hf_ema)]
    out += [(k, v) for k, v in A.ANCHORS.items()]
    if weight_dtype != torch.float32:
        out += [(k, v) for k, v in A.FP32_EMA_ANCHORS.items()]
    return [(k, v) for k, v in out if k not in skip]


def bench_case(size: str, dtype_name: str, args) -> dict:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = A.build_llama(size, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    w_bytes = torch.finfo(dtype).bits // 8
    todo = builders(dtype, set(args.skip))
    # Interleave everything when all EMA copies fit comfortably, else build / time / free one at a time per round.
    need = n_params * sum(4 if k in ("hf_ema", "classic_fp32", "timm_v3_fp32") else w_bytes for k, _ in todo)
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
    anchors = [r for r in rows if not r.get("missing") and r["key"] != "hf_ema"]
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
    return {
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
    hf = next(r for r in res["rows"] if r["key"] == "hf_ema")
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
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    results = []
    for size in args.sizes.split(","):
        for dtype_name in args.dtypes.split(","):
            res = bench_case(size, dtype_name, args)
            print_case(res)
            results.append(res)
            sys.stdout.flush()
    print(f"\nload average at the end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

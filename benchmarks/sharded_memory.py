"""Saving and resuming a sharded EMA: each rank's extra memory, the bytes on disk and the time, for the DDP-sharded
EMA, FSDP1, FSDP2 and DeepSpeed ZeRO-3, at 2 and 4 ranks on CPU (gloo).

Run: `.venv/bin/python benchmarks/sharded_memory.py` (one `torchrun` per mode, number of ranks and model dtype; about
10 minutes on 2 cores). It prints the table and writes it, with the command, to docs/benchmarks/sharded_memory.md
(`--page`).

For a 50M-parameter Llama built from a config, on every rank:
- `shard MiB`: the EMA this rank holds (`ModelEMA.num_bytes()`, fp32);
- `save extra MiB`: the highest resident memory (RSS, sampled every millisecond) while `save_ema` writes `ema/`,
  above the RSS just before; the target is at most `1.5 x shard + 64 MiB` on every rank;
- `gather MiB`: the same, on rank 0, for what a save needed before every rank wrote its own part (format 1): the full
  fp32 EMA gathered onto rank 0, then a copy in the model's dtype. Measured in the same run, for comparison;
- `B/param`: bytes of the whole `ema/` folder per model parameter;
- `save s`, `resume s`: wall time of `save_ema` and of `load_ema` into a fresh EMA at the same number of ranks (every
  rank reads its own byte ranges), and whether the resumed EMA equals the saved one bit for bit.
ZeRO-3 runs DeepSpeed on its CPU accelerator (`DS_ACCELERATOR=cpu`) with gloo; it is skipped when `deepspeed` is
not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _docs_page import DocsPage, default_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ["ddp_sharded", "fsdp1", "fsdp2", "zero3"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2**20


def build_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread; `extra` is the highest value seen inside the `with` block above the
    value on entry."""

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def prepare(model, mode: str):
    """The model wrapped for `mode`: the same FSDP2 / FSDP1 / DDP wrapping as the multi-process tests
    (tests/dist/common.py), or `deepspeed.initialize` with ZeRO-3."""
    if mode == "zero3":
        import deepspeed

        config = {
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": 1,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
        }
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine.module
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from common import wrap

    return wrap(model, "ddp" if mode == "ddp_sharded" else mode)


def worker(mode: str, dtype_name: str, out: Path) -> None:
    import gc

    import torch.distributed as dist

    from hf_ema import ModelEMA, load_ema, save_ema

    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model = build_model(DTYPES[dtype_name])
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = prepare(model, mode)
    ema = ModelEMA(wrapped, decay=0.999, shard_across_ranks=True)
    ema.update()
    gc.collect()
    dist.barrier()
    with PeakRSS() as save:
        save_ema(ema, out / "ema")
    dist.barrier()
    # What a save needed before (format 1): the full fp32 EMA gathered onto rank 0, then a copy in the model's dtype.
    with PeakRSS() as gather:
        full = ema.full_state_dict(dtype="ema")
        if full is not None:
            cast = {k: v.to(DTYPES[dtype_name]) for k, v in full.items()}
            del cast
        del full
    gc.collect()
    dist.barrier()
    fresh = ModelEMA(wrapped, decay=0.999, shard_across_ranks=True)
    gc.collect()
    dist.barrier()
    with PeakRSS() as resume:
        load_ema(fresh, out / "ema")
    exact = all(torch.equal(a, b) for a, b in zip(ema.shadow + ema.copied, fresh.shadow + fresh.copied))
    disk = sum(p.stat().st_size for p in (out / "ema").rglob("*") if p.is_file())
    result = {
        "mode": mode,
        "dtype": dtype_name,
        "world": dist.get_world_size(),
        "rank": rank,
        "layout": ema.layout.kind,
        "params": n_params,
        "shard_bytes": ema.num_bytes(),
        "save_extra": save.extra,
        "save_seconds": save.seconds,
        "gather_extra": gather.extra,
        "resume_extra": resume.extra,
        "resume_seconds": resume.seconds,
        "resume_exact": exact,
        "disk_bytes": disk,
        "files": sorted(p.name for p in (out / "ema").iterdir()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, world: int, dtype_name: str, root: Path) -> list[dict]:
    out = root / f"{mode}-{world}-{dtype_name}"
    out.mkdir(parents=True)
    # A fixed mmap threshold makes glibc return freed large tensors to the OS at once, so RSS follows live memory
    # (with its default dynamic threshold, freed 16 MiB tensors stay in the heap and inflate every later sample).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="1048576")
    if mode == "zero3":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), __file__]
    proc = subprocess.run([*cmd, "--worker", mode, dtype_name, str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} ({world} ranks, {dtype_name}) failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _per_rank(ranks: list[dict], key: str) -> str:
    return " / ".join(f"{r[key] / MIB:.0f}" for r in ranks)


def table(runs: list[list[dict]], skipped: list[str]) -> str:
    columns = [
        "mode",
        "ranks",
        "model",
        "EMA shard MiB (per rank)",
        "save extra MiB (per rank)",
        "worst rank: extra / (1.5 x shard + 64 MiB)",
        "gather MiB, rank 0 (format 1)",
        "ema/ bytes per parameter",
        "save s",
        "resume s",
        "resume bit-exact",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for ranks in runs:
        r0 = ranks[0]
        worst = max(r["save_extra"] / (1.5 * r["shard_bytes"] + 64 * MIB) for r in ranks)
        cells = [
            r0["mode"],
            str(r0["world"]),
            r0["dtype"],
            _per_rank(ranks, "shard_bytes"),
            _per_rank(ranks, "save_extra"),
            f"{worst:.2f}",
            f"{r0['gather_extra'] / MIB:.0f}",
            f"{r0['disk_bytes'] / r0['params']:.2f}",
            f"{max(r['save_seconds'] for r in ranks):.1f}",
            f"{max(r['resume_seconds'] for r in ranks):.1f}",
            "yes" if all(r["resume_exact"] for r in ranks) else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(skipped)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--ranks", default="2,4", help="Comma-separated numbers of ranks (default: 2,4)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="Comma-separated model dtypes: bf16, fp32")
    parser.add_argument("--page", default=default_path("sharded_memory"), help="results page to write ('' for none)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return
    modes, worlds, dtypes = args.modes.split(","), [int(w) for w in args.ranks.split(",")], args.dtypes.split(",")
    for value, allowed, name in ((modes, MODES, "--modes"), (dtypes, list(DTYPES), "--dtypes")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}, expected some of {allowed}")
    runs, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            for mode in modes:
                for world in worlds:
                    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
                        skipped.append(f"| zero3 | {world} | {dtype} | not measured: `deepspeed` is not installed |")
                        continue
                    runs.append(launch(mode, world, dtype, Path(tmp)))
                    print(table(runs[-1:], []).splitlines()[-1], file=sys.stderr, flush=True)
    params = runs[0][0]["params"] if runs else 0
    page = DocsPage(
        "sharded_memory",
        "Saving and resuming a sharded EMA: memory, disk, time",
        intro=(
            f"A Llama of {params / 1e6:.1f}M parameters built from a config, on CPU ranks (gloo); the EMA in fp32, "
            "each rank holding its shard. One `torchrun` per mode, number of ranks and model dtype.\n\n" + _NOTES
        ),
    )
    page.add(table(runs, skipped))
    page.write(args.page)


_NOTES = """- `save extra MiB`: the highest resident memory of each rank while `save_ema` writes `ema/` (RSS sampled every
  millisecond, `MALLOC_MMAP_THRESHOLD_=1048576` so that freed tensors leave the RSS at once), above the RSS just
  before it. Every rank writes its own part of each tensor into the final files (safetensors headers are computed
  from the shapes alone), casting at most 16 MiB at a time; no rank gathers anything. The target is at most
  `1.5 x shard + 64 MiB` on every rank (`worst rank` below 1.00). Rank 0's ~25 MiB is paid once per process: the
  modules the first save imports (config and safetensors writers); a second save in the same process adds under
  1 MiB.
- `gather MiB, rank 0 (format 1)`: for comparison, measured in the same run, what a save used to need on rank 0:
  the full fp32 EMA gathered there, then a copy of it in the model's dtype.
- `ema/ bytes per parameter`: the whole folder (weights, exact copy, JSON) over the model's parameters: 2 (bf16
  weights) + 4 (the exact fp32 EMA) for a bf16 model, 4 for an fp32 model, whose weights file holds the EMA exactly.
- `resume s`: `load_ema` into a fresh EMA at the same number of ranks: each rank reads its own byte ranges.
- ZeRO-3 runs DeepSpeed on its CPU accelerator (`DS_ACCELERATOR=cpu`) with gloo.
- Times come from a shared 2-core machine and are only indicative.
"""


if __name__ == "__main__":
    main()

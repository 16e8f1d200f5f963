"""Per-rank EMA memory and save-time peak memory of each sharding mode, 2 ranks on CPU (gloo).

Run: `.venv/bin/python benchmarks/sharded_memory.py` (launches one `torchrun --nproc_per_node 2` per mode).

For a ~50M-parameter Llama built from a config it measures, on every rank:
- `ema MiB`: bytes of the EMA tensors this rank holds (`ModelEMA.num_bytes()`), and that as a fraction of a full
  fp32 EMA;
- `save peak MiB`: the highest resident memory (RSS, sampled every millisecond) while `save_ema` writes `ema/`,
  above the RSS just before the save. Rank 0 gathers and writes; other ranks only take part in the gathers and
  write their own shard file.
- `save s`: wall time of `save_ema`.

Modes: `replicated` (a full EMA on every rank, `shard_across_ranks=False`), `ddp_sharded` (DDP with the EMA split
across ranks), `fsdp1` (`use_orig_params=True`) and `fsdp2` (`fully_shard`), each decoder layer its own unit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MODES = ["replicated", "ddp_sharded", "fsdp1", "fsdp2"]
MIB = 2**20


def build_model():
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
    return AutoModelForCausalLM.from_config(config)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread; `peak` is the highest value seen inside the `with` block."""

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def wrap(model, mode: str):
    # The same FSDP2 / FSDP1 / DDP wrapping as the multi-process tests (tests/dist/common.py), so that the memory
    # measured here is that of the layouts the tests check.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "dist"))
    from common import wrap as wrap_for_tests

    return wrap_for_tests(model, "ddp" if mode in ("replicated", "ddp_sharded") else mode)


def worker(mode: str, out: Path) -> None:
    import torch.distributed as dist

    from hf_ema import ModelEMA, save_ema

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = wrap(model, mode)
    before = rss_bytes()
    ema = ModelEMA(wrapped, decay=0.999, shard_across_ranks=(mode != "replicated"))
    ema.update()
    ema_rss = rss_bytes() - before
    dist.barrier()
    start = time.perf_counter()
    with PeakRSS() as peak:
        save_ema(ema, out / "ema")
    seconds = time.perf_counter() - start
    result = {
        "mode": mode,
        "rank": rank,
        "layout": ema.layout.kind,
        "params": n_params,
        "ema_bytes": ema.num_bytes(),
        "ema_rss_bytes": ema_rss,
        "save_peak_bytes": peak.peak - peak.start,
        "save_seconds": seconds,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, root: Path) -> list[dict]:
    out = root / mode
    out.mkdir(parents=True)
    # A fixed mmap threshold makes glibc return freed large tensors to the OS at once, so RSS follows live memory
    # (with its default dynamic threshold, freed 16 MiB tensors stay in the heap and inflate every later sample).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="1048576")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        mode,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of " + ",".join(MODES))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            rows.extend(launch(mode, Path(tmp)))
    full = rows[0]["params"] * 4
    print(f"model: {rows[0]['params'] / 1e6:.1f}M parameters, full fp32 EMA {full / MIB:.1f} MiB; 2 ranks, CPU, gloo")
    header = (
        f"{'mode':<12} {'layout':<12} {'rank':>4} {'ema MiB':>9} {'of full':>8} {'save peak MiB':>14} {'save s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:<12} {r['layout']:<12} {r['rank']:>4} {r['ema_bytes'] / MIB:>9.1f} "
            f"{r['ema_bytes'] / full:>8.2f} {r['save_peak_bytes'] / MIB:>14.1f} {r['save_seconds']:>7.2f}"
        )


if __name__ == "__main__":
    main()

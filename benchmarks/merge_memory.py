"""Peak memory of merging five ~50M-parameter checkpoints: `hf_ema.merge_checkpoints` against simpler ways.

Each way runs in a fresh subprocess, after `import torch, transformers, hf_ema`. Its peak resident memory is read
from `/proc/self/status` `VmHWM` after resetting the high-water mark with `/proc/self/clear_refs` right before the
merge, so the figure is what the merge itself adds on top of the interpreter, and it counts memory-mapped file
pages that are resident (which `tracemalloc` would miss, as it would every torch allocation).

Ways compared:
- `hf_ema (streamed)`: `merge_checkpoints`, one tensor at a time, each input file opened and closed per tensor.
- `safe_open kept open`: the same loop, but the five files stay open (memory-mapped) for the whole merge.
- `load one, accumulate`: `load_file` each checkpoint in turn into fp32 accumulators (a common script).
- `load all, average`: `load_file` all five, then average (the naive way).

Usage:
    python benchmarks/merge_memory.py [--dtype float32 bfloat16] [--n 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _docs_page import DocsPage, default_path  # noqa: E402

WORKER = r"""
import json, os, sys, time
from pathlib import Path
import torch, transformers  # noqa: F401  (imported before the baseline, as in a real script)
import hf_ema
from safetensors import safe_open
from safetensors.torch import load_file, save_file

way, out, *folders = sys.argv[1:]
folders = [Path(f) for f in folders]
files = [str(f / "model.safetensors") for f in folders]

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
base = status("VmRSS")
start = time.perf_counter()
n = len(files)
if way == "hf_ema":
    hf_ema.merge_checkpoints(folders, out, progress=False)
elif way == "keep_open":
    handles = [safe_open(f, framework="pt") for f in files]
    result = {}
    for key in handles[-1].keys():
        acc = None
        for h in handles:
            t = h.get_tensor(key)
            acc = t.float() / n if acc is None else acc.add_(t.float(), alpha=1 / n)
        result[key] = acc.to(t.dtype)
    save_file(result, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
elif way == "load_one":
    acc = None
    for f in files:
        sd = load_file(f)
        if acc is None:
            acc = {k: v.float() / n for k, v in sd.items()}
        else:
            for k, v in sd.items():
                acc[k].add_(v.float(), alpha=1 / n)
        dtypes = {k: v.dtype for k, v in sd.items()}
        del sd
    save_file({k: v.to(dtypes[k]) for k, v in acc.items()}, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
elif way == "load_all":
    sds = [load_file(f) for f in files]
    result = {k: (sum(sd[k].float() for sd in sds) / n).to(sds[0][k].dtype) for k in sds[0]}
    save_file(result, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
wall = time.perf_counter() - start
print(json.dumps({"base": base, "peak": status("VmHWM"), "wall": wall}))
"""

WAYS = [
    ("hf_ema", "hf_ema (streamed)"),
    ("keep_open", "safe_open kept open"),
    ("load_one", "load one, accumulate"),
    ("load_all", "load all, average"),
]


def make_checkpoints(root: Path, n: int, dtype: str) -> tuple[list[Path], int, int]:
    """Save `n` perturbed copies of a ~50M-parameter Llama; returns the folders, parameter count and file bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    folders = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        folder = root / f"checkpoint-{(i + 1) * 100}"
        model.save_pretrained(folder)
        folders.append(folder)
    size = (folders[0] / "model.safetensors").stat().st_size
    return folders, params, size


def measure(way: str, folders: list[Path], out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    if way != "hf_ema":
        out.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, way, str(out), *map(str, folders)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="checkpoint dtypes to test")
    parser.add_argument("--n", type=int, default=5, help="number of checkpoints (default: 5)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--page", default=default_path("merge_memory"), help="results page to write ('' for none)")
    args = parser.parse_args()
    mib = 1024 * 1024
    page = DocsPage(
        "merge_memory",
        "Memory of a checkpoint merge",
        intro=(
            "Peak resident memory added by merging checkpoints of a ~50M-parameter Llama, each way of merging in a "
            "fresh subprocess (`VmHWM` of `/proc/self/status`, reset after the imports, so memory-mapped pages that "
            "stay resident count too). `hf_ema (streamed)` is `merge_checkpoints`: one tensor at a time, each input "
            "file opened and closed per tensor; `safe_open kept open` is the same loop with the files left open; "
            "`load one, accumulate` loads each checkpoint in turn into fp32 accumulators; `load all, average` loads "
            "them all. Wall times on a shared machine are only indicative."
        ),
    )
    for dtype in args.dtype:
        root = Path(args.workdir or tempfile.mkdtemp(prefix="merge_memory_")) / dtype
        try:
            folders, params, size = make_checkpoints(root, args.n, dtype)
            page.add(
                f"\n### {args.n} checkpoints of {params / 1e6:.1f}M parameters, {dtype} ({size / mib:.0f} MiB each)\n"
            )
            page.add("| way | peak RSS added (MiB) | x model size | wall (s) |")
            page.add("|---|---:|---:|---:|")
            for way, label in WAYS:
                r = measure(way, folders, root / f"out-{way}")
                added = r["peak"] - r["base"]
                page.add(f"| {label} | {added / mib:.0f} | {added / size:.2f} | {r['wall']:.1f} |")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    page.write(args.page)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

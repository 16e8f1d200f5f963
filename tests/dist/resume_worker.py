"""torchrun worker: resume an EMA saved at another world size, then save it again at this one.

Usage: `torchrun --nproc_per_node N tests/dist/resume_worker.py SRC_ROOT OUT_ROOT fsdp2,fsdp1,ddp,zero3sim` (gloo,
CPU). For each mode it wraps the model of `common.py` for N ranks, restores `SRC_ROOT/<mode>/ckpt/ema` (written by
`ema_worker.py` or by this worker at another world size) with `load_ema`, compares every rank's EMA with its part of
the saved tensors (read with `safetensors` and cut with the layout's `shard_full_tensor`), saves the EMA again to
`OUT_ROOT/<mode>/ckpt/ema` and writes what it found to `OUT_ROOT/<mode>/rank<r>.json`. `tests/test_sharding.py`
checks that the re-saved folder is byte for byte the one it was read from.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DECAY, build, build_model, saved_ema, wrap  # noqa: E402
from ema_worker import simulate_zero3  # noqa: E402

from hf_ema import ModelEMA, load_ema, save_ema  # noqa: E402


def build_ema(mode: str) -> ModelEMA:
    if mode == "zero3sim":
        model = build_model(seed=3)
        simulate_zero3(model)
        return ModelEMA(model, decay=DECAY)
    return ModelEMA(wrap(build(mode, seed=3), mode), decay=DECAY)


def main() -> None:
    src_root, out_root = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for mode in sys.argv[3].split(","):
        src, out = src_root / mode / "ckpt" / "ema", out_root / mode
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
        dist.barrier()
        ema = build_ema(mode)
        meta = load_ema(ema, src)
        saved = saved_ema(src)
        expected = [
            ema.layout.shard_full_tensor(name, saved[name], local)
            for name, local in zip(ema.names + ema.copied_names, ema.shadow + ema.copied)
        ]
        res = {
            "layout": ema.layout.kind,
            "world_size": dist.get_world_size(),
            "saved_world_size": meta["world_size"],
            "step": ema.step,
            "equal": all(torch.equal(a, b.to(a.dtype)) for a, b in zip(ema.shadow + ema.copied, expected)),
        }
        save_ema(ema, out / "ckpt" / "ema")
        (out / f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

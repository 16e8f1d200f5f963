"""torchrun worker: a NaN or an inf in one rank's shard makes every rank skip the same EMA update.

Usage: `torchrun --nproc_per_node 2 tests/dist/nonfinite_worker.py OUT_DIR ddp,ddp_background,fsdp2` (gloo, CPU).

Modes (a `_triton` suffix: the same with the GPU update, run by Triton's interpreter): `ddp` (DDP model, the EMA sharded across the ranks: the weights are replicated, each rank averages its chunk
of each flattened tensor), `ddp_background` (the same, offloaded to the CPU and updated in the background thread:
the ranks agree from that thread, over a process group of their own) and `fsdp2` (`fully_shard`: each rank holds
its rows). After the optimizer step of each step in `INJECT`, the last element of `TARGET`, which only rank 1's
shard holds, becomes NaN or inf (in every replica under DDP, in rank 1's local shard under FSDP2); the EMA updates,
and the element is restored. Rank 0 writes every step's full weights and the gathered EMA, each rank its counters,
to `OUT_DIR/<mode>/`; `tests/test_nonfinite.py` recomputes the EMA of the finite steps from the weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LR, STEPS, batches, build_model, rank_rows, train_step, wrap  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_ema import ModelEMA  # noqa: E402
from hf_ema.engine.kernels import all_finite  # noqa: E402

INJECT = {3: math.nan, 5: math.inf}
TARGET = "model.layers.1.mlp.down_proj.weight"
#: Weight 1 - DECAY = 0.05: the native kernel's fused check, undone on the rank that did not see the NaN.
DECAY = 0.95


def full_weights(model, names: list[str], sharded: bool) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise RuntimeError(f"EMA names not among the parameters: {missing}")
    out = {}
    for name in names:  # full_tensor() is a collective: same order on every rank
        p = params[name].detach()
        out[name] = (p.full_tensor() if sharded else p).double().clone()
    return out


def local_target(model, sharded: bool) -> torch.Tensor:
    p = dict(model.named_parameters())[TARGET].detach()
    return (p.to_local() if sharded else p).view(-1)


def run(mode: str, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    inner = build_model(seed=0)
    engine = mode.removesuffix("_background").removesuffix("_triton")
    wrapped = wrap(inner, engine)
    sharded = engine == "fsdp2"
    # Background: every update waits for the fold before it (no coalescing), so that the reference is every step.
    kwargs = {"device": "cpu", "async_update": True, "max_update_interval": 1} if mode.endswith("_background") else {}
    # `_triton`: the GPU update, run by Triton's interpreter on the CPU; the ranks agree through the device flags.
    os.environ["HF_EMA_KERNEL"] = "triton" if mode.endswith("_triton") else "auto"
    os.environ["TRITON_INTERPRET"] = "1" if mode.endswith("_triton") else "0"
    ema = ModelEMA(wrapped, decay=DECAY, **kwargs)
    if mode.endswith("_triton") and ema._updater.device_update is None:
        raise RuntimeError("the Triton update was not chosen")
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    data = batches()
    records = {f"0/{n}": t for n, t in full_weights(inner, ema.names, sharded).items()}
    returned, saw = {}, False
    for step in range(1, STEPS + 1):
        train_step(wrapped, optimizer, rank_rows(data[step - 1], rank, world))
        target = local_target(inner, sharded)
        saved = None
        # DDP: every replica holds the element (only rank 1's EMA chunk reads it); FSDP2: only rank 1 holds it.
        if step in INJECT and (rank == world - 1 or not sharded):
            saved = target[-1].clone()
            target[-1] = INJECT[step]
        if step in INJECT:
            saw = saw or not all_finite(ema.live_tensors)
        else:
            records.update({f"{step}/{n}": t for n, t in full_weights(inner, ema.names, sharded).items()})
        returned[step] = ema.update()
        if saved is not None:
            target[-1] = saved
    full = ema.full_state_dict(dtype="ema")
    folder = out / mode
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: full[n].contiguous() for n in ema.names}, str(folder / "ema.safetensors"))
        save_file({k: v.contiguous() for k, v in records.items()}, str(folder / "weights.safetensors"))
    dist.barrier()
    info = {
        "inject": {str(k): str(v) for k, v in INJECT.items()},
        "steps": STEPS,
        "decay": DECAY,
        "layout": ema.layout.kind,
        "returned": {str(k): v for k, v in returned.items()},
        "num_skipped": ema.num_skipped,
        "last_skipped_step": ema.last_skipped_step,
        "num_updates": ema.num_updates,
        "saw_nonfinite_locally": saw,
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(info, indent=2))
    ema.close()
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        for mode in sys.argv[2].split(","):
            run(mode, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

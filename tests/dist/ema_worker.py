"""torchrun worker: `ModelEMA` in a plain-torch training loop under FSDP2, FSDP1 (use_orig_params) and DDP.

Usage: `torchrun --nproc_per_node 2 tests/dist/ema_worker.py OUT_DIR fsdp2,fsdp1,ddp` (gloo, CPU). For each mode it
trains `STEPS` steps, saves the EMA at `SAVE_STEP` and at the end, checks `swapped()` and `copy_to()`, resumes
from the `SAVE_STEP` checkpoint both from the per-rank shards and by re-sharding the full weights, and writes what
it measured to `OUT_DIR/<mode>/rank<r>.json`. `tests/test_sharding.py` compares it with a single-process run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DECAY,
    LR,
    SAVE_STEP,
    STEPS,
    batches,
    build,
    build_model,
    eval_loss,
    rank_rows,
    train_step,
    wrap,
)

from hf_ema import ModelEMA, load_ema, save_ema  # noqa: E402
from hf_ema.sharding.rank_files import load_rank_shard  # noqa: E402
from hf_ema.ema_folder import read_ema_state  # noqa: E402


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def check_resume(ema: ModelEMA, model, out: Path, shadow_at_save: list[torch.Tensor], res: dict) -> None:
    """Restore `out/ckpt/ema` into `ema` from this rank's shard file, then into a fresh EMA by re-sharding the full
    weights (what happens when the world size changed: the shard files are dropped); record both differences."""
    meta = read_ema_state(out / "ckpt" / "ema")
    res["loaded_from_shards"] = load_rank_shard(ema, out / "ckpt" / "ema", meta)
    res["shard_resume_max_diff"] = max_diff(ema.shadow, shadow_at_save)
    if dist.get_rank() == 0:
        shutil.copytree(out / "ckpt" / "ema", out / "noshards" / "ema")
        shutil.rmtree(out / "noshards" / "ema" / "shards")
    dist.barrier()
    fresh = ModelEMA(model, decay=DECAY)
    load_ema(fresh, out / "noshards" / "ema")
    res["reshard_resume_max_diff"] = max_diff(fresh.shadow, shadow_at_save)


def eval_module(wrapped, mode: str):
    # FSDP runs its forward through the wrapper (it gathers the shards); DDP can use the plain module.
    return wrapped.module if mode == "ddp" else wrapped


def run(mode: str, out: Path) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    wrapped = wrap(build(mode, seed=0), mode)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    ema = ModelEMA(wrapped, decay=DECAY)
    res: dict = {"layout": ema.layout.kind, "ema_bytes": ema.num_bytes(), "names": ema.names}
    snapshot = shadow_at_save = None
    for step in range(1, STEPS + 1):
        train_step(wrapped, optimizer, rank_rows(data[step - 1], rank, world))
        ema.update()
        if step == SAVE_STEP:
            save_ema(ema, out / "ckpt" / "ema")
            snapshot = [t.clone() for t in ema._live]
            shadow_at_save = [t.clone() for t in ema.shadow]
    save_ema(ema, out / "final" / "ema")

    # swapped(): the model computes with the EMA inside the block and with its raw weights again after it.
    model = eval_module(wrapped, mode)
    raw_before = eval_loss(model)
    with ema.swapped():
        res["swapped_loss"] = eval_loss(model)
    res["raw_loss"] = raw_before
    res["raw_loss_after"] = eval_loss(model)

    # copy_to() another, unsharded model: every rank gets the full EMA.
    other = build(mode, seed=5)
    ema.copy_to(other)
    res["copy_to_loss"] = eval_loss(other)

    # Resume from SAVE_STEP: a fresh model and EMA, the model's shards restored from the snapshot.
    wrapped2 = wrap(build(mode, seed=3), mode)
    optimizer2 = torch.optim.SGD(wrapped2.parameters(), lr=LR)
    ema2 = ModelEMA(wrapped2, decay=DECAY)
    with torch.no_grad():
        for live, saved in zip(ema2._live, snapshot):
            live.copy_(saved)
        ema2.layout.after_write(ema2._live)
    check_resume(ema2, wrapped2, out, shadow_at_save, res)
    res["resumed_step"] = ema2.step
    for step in range(SAVE_STEP + 1, STEPS + 1):
        train_step(wrapped2, optimizer2, rank_rows(data[step - 1], rank, world))
        ema2.update()
    save_ema(ema2, out / "resumed" / "ema")
    return res


class _Status:
    """Stands in for DeepSpeed's `ZeroParamStatus` enum member (the layout reads `.name`)."""

    def __init__(self, name: str) -> None:
        self.name = name


def run_zero3_simulation(out: Path) -> dict:
    """ZeRO-3's documented partitioning, built by hand (DeepSpeed cannot be installed here): each parameter is
    flattened, padded to a multiple of the world size and rank r keeps `[r * P, (r + 1) * P)` in `ds_tensor`; the
    full `param.data` is freed, except for one "persistent" parameter, as DeepSpeed keeps small ones. Training is
    simulated by writing new weights into the partitions; a plain EMA of the same full weights is the reference.
    """
    from safetensors.torch import save_file

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(seed=0)
    reference = build_model(seed=0)
    ref_ema = ModelEMA(reference, decay=DECAY, shard_across_ranks=False)
    params = dict(model.named_parameters())
    persistent = "model.norm.weight"
    for i, (name, p) in enumerate(params.items()):
        flat = p.detach().reshape(-1)
        size = -(-flat.numel() // world)
        padded = torch.zeros(size * world)
        padded[: flat.numel()] = flat
        p.ds_tensor = padded[rank * size : (rank + 1) * size].clone()
        p.ds_numel, p.ds_shape, p.ds_id = flat.numel(), p.shape, i
        p.ds_process_group = dist.group.WORLD
        p.ds_persist = name == persistent
        p.ds_status = _Status("AVAILABLE" if p.ds_persist else "NOT_AVAILABLE")
        if not p.ds_persist:
            p.data = torch.empty(0)
    ema = ModelEMA(model, decay=DECAY)
    res: dict = {"layout": ema.layout.kind, "ema_bytes": ema.num_bytes(), "full_bytes": ref_ema.num_bytes()}
    ref_params = dict(reference.named_parameters())
    for step in range(1, STEPS + 1):
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, p in params.items():
                full = ref_params[name]
                full.add_(0.01 * torch.randn(full.shape, generator=gen))
                flat = full.reshape(-1)
                size = p.ds_tensor.numel()
                piece = flat[rank * size : min((rank + 1) * size, flat.numel())]
                p.ds_tensor.zero_()[: piece.numel()].copy_(piece)
                if p.ds_persist:
                    p.data.copy_(full)
        ema.update()
        ref_ema.update()
        if step == SAVE_STEP:
            save_ema(ema, out / "ckpt" / "ema")
            shadow_at_save = [t.clone() for t in ema.shadow]
    save_ema(ema, out / "final" / "ema")
    expected = dict(zip(ref_ema.names, ref_ema.shadow))  # a replicated EMA: its own tensors are the full ones
    if rank == 0:
        save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "reference.safetensors"))
    # swapped(): the partitions hold the EMA, and the persistent parameter's full tensor is refreshed.
    ema_partitions = [t.clone() for t in ema.shadow]
    with ema.swapped():
        res["swap_persistent_diff"] = float((params[persistent].data - expected[persistent]).abs().max())
        res["swap_partition_diff"] = max_diff([params[n].ds_tensor for n in ema.names], ema_partitions)
    res["after_persistent_diff"] = float((params[persistent].data - ref_params[persistent].data).abs().max())
    ema2 = ModelEMA(model, decay=DECAY)
    check_resume(ema2, model, out, shadow_at_save, res)
    return res


def main() -> None:
    out_root = Path(sys.argv[1])
    modes = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for mode in modes:
        out = out_root / mode
        if dist.get_rank() == 0:
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        res = run_zero3_simulation(out) if mode == "zero3sim" else run(mode, out)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res, indent=1))
        dist.barrier()
    # FSDP1 without use_orig_params: the EMA refuses with a message saying what to set.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    flat = FSDP(build_model(), device_id=torch.device("cpu"), use_orig_params=False)
    try:
        ModelEMA(flat, decay=DECAY)
        error = {"type": None, "message": ""}
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        error = {"type": type(err).__name__, "message": str(err)}
    if dist.get_rank() == 0:
        (out_root / "fsdp1_flat_error.json").write_text(json.dumps(error))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

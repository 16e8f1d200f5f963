"""torchrun worker: `ModelEMA` in a plain-torch training loop under FSDP2, FSDP1 (use_orig_params) and DDP.

Usage: `torchrun --nproc_per_node 2 tests/dist/ema_worker.py OUT_DIR fsdp2,fsdp1,ddp` (gloo, CPU). For each mode it
trains `STEPS` steps, saves the EMA at `SAVE_STEP` and at the end (also through the main process as without a
shared filesystem, and split into small files), checks `swapped()` and `copy_to()`, resumes from the `SAVE_STEP`
checkpoint (and from the same checkpoint rewritten in the format-1 layout, with and without `shards/`), and writes
what it measured to `OUT_DIR/<mode>/rank<r>.json`. `tests/test_sharding.py` compares it with a single-process run.
A `_bf16` suffix trains a bf16 model; `zero3sim` is ZeRO-3's partitioning built by hand.
"""

from __future__ import annotations

import importlib.util
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
    build_unet,
    eval_loss,
    rank_rows,
    train_step,
    wrap,
)

from hf_ema import ModelEMA, load_ema, save_ema  # noqa: E402
from hf_ema.sharding.rank_files import rank_shard_path, save_file_atomic  # noqa: E402

#: `max_shard_size` of the split saves: several weights files for the tiny model.
SPLIT = "20KB"


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def write_format1(ema: ModelEMA, src: Path, dst: Path, shards: bool) -> None:
    """`src` rewritten as hf-ema's format 1 wrote it: `ema_state.json` without the tensor map and, with `shards`,
    every rank's own EMA tensors in `shards/rank-RRRRR-of-WWWWW.safetensors` (and no weights files, so that only
    the shard files can restore the EMA)."""
    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
        meta = json.loads((dst / "ema_state.json").read_text())
        meta["format_version"] = 1
        del meta["tensors"]
        (dst / "ema_state.json").write_text(json.dumps(meta))
        if shards:
            for path in dst.glob("*.safetensors*"):
                path.unlink()
    dist.barrier()
    if shards:
        layout = ema.layout
        tensors = {n: t.contiguous() for n, t in zip(ema.names + ema.copied_names, ema.shadow + ema.copied)}
        metadata = {
            "format": "pt",
            "producer": "hf_ema",
            "layout": layout.kind,
            "rank": str(layout.rank),
            "world_size": str(layout.world_size),
            "step": str(ema.step),
        }
        save_file_atomic(tensors, rank_shard_path(dst, layout.rank, layout.world_size), metadata)
    dist.barrier()


def check_resume(
    ema: ModelEMA, model, out: Path, shadow_at_save: list[torch.Tensor], res: dict, format1_full: bool = True
) -> None:
    """Restore `out/ckpt/ema` into `ema` (each rank reads its own byte ranges); then into fresh EMAs from the same
    EMA in the format-1 layout, from the per-rank shard files and (`format1_full`; format-1 adapter folders always
    had `ema_state.safetensors`) from the full weights; record whether each restored the saved EMA bit for bit."""
    meta = load_ema(ema, out / "ckpt" / "ema")
    res["resume_equal"] = equal(ema.shadow, shadow_at_save)
    res["resume_max_diff"] = max_diff(ema.shadow, shadow_at_save)
    res["resume_meta_step"] = meta["step"]
    write_format1(ema, out / "ckpt" / "ema", out / "format1_shards" / "ema", shards=True)
    fresh = ModelEMA(model, decay=DECAY)
    load_ema(fresh, out / "format1_shards" / "ema")
    res["format1_shards_equal"] = equal(fresh.shadow, shadow_at_save)
    if format1_full:
        write_format1(ema, out / "ckpt" / "ema", out / "format1_full" / "ema", shards=False)
        fresh = ModelEMA(model, decay=DECAY)
        load_ema(fresh, out / "format1_full" / "ema")
        res["format1_full_equal"] = equal(fresh.shadow, shadow_at_save)


def extra_saves(ema: ModelEMA, out: Path) -> None:
    """The final EMA again: through the main process, as without a shared filesystem, and split into small files."""
    save_ema(ema, out / "streamed" / "ema", shared_filesystem=False)
    save_ema(ema, out / "split" / "ema", max_shard_size=SPLIT)


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
            snapshot = [t.clone() for t in ema.live_tensors]
            shadow_at_save = [t.clone() for t in ema.shadow]
    save_ema(ema, out / "final" / "ema")
    extra_saves(ema, out)

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
        for live, saved in zip(ema2.live_tensors, snapshot):
            live.copy_(saved)
        ema2.layout.after_write(ema2.live_tensors)
    check_resume(ema2, wrapped2, out, shadow_at_save, res, format1_full=not mode.startswith("lora_"))
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


def simulate_zero3(model, persistent: str | None = None) -> dict[str, torch.nn.Parameter]:
    """Partition `model`'s parameters as ZeRO-3 does, by hand: each parameter is flattened, padded to a multiple of
    the world size and rank r keeps `[r * P, (r + 1) * P)` in `ds_tensor`; the full `param.data` is freed, except
    for the `persistent` parameter, as DeepSpeed keeps small ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = dict(model.named_parameters())
    for i, (name, p) in enumerate(params.items()):
        flat = p.detach().reshape(-1)
        size = -(-flat.numel() // world)
        padded = torch.zeros(size * world, dtype=flat.dtype)
        padded[: flat.numel()] = flat
        p.ds_tensor = padded[rank * size : (rank + 1) * size].clone()
        p.ds_numel, p.ds_shape, p.ds_id = flat.numel(), p.shape, i
        p.ds_process_group = dist.group.WORLD
        p.ds_persist = name == persistent
        p.ds_status = _Status("AVAILABLE" if p.ds_persist else "NOT_AVAILABLE")
        if not p.ds_persist:
            p.data = torch.empty(0, dtype=p.dtype)
    return params


def run_zero3_simulation(out: Path) -> dict:
    """ZeRO-3's documented partitioning, built by hand (`simulate_zero3`). Training is simulated by writing new
    weights into the partitions; a plain EMA of the same full weights is the reference.
    """
    from safetensors.torch import save_file

    rank = dist.get_rank()
    model = build_model(seed=0)
    reference = build_model(seed=0)
    ref_ema = ModelEMA(reference, decay=DECAY, shard_across_ranks=False)
    persistent = "model.norm.weight"
    params = simulate_zero3(model, persistent)
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
    extra_saves(ema, out)
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
    res["resumed_step"] = ema2.step
    return res


def unet_save_refused(out_root: Path) -> None:
    """A sharded model whose `save_pretrained` ignores `state_dict` (diffusers): `save_ema` raises on every rank
    instead of writing the model's raw weights, and leaves nothing behind."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    unet = fully_shard(build_unet(), mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    ema = ModelEMA(unet, decay=DECAY)
    try:
        save_ema(ema, out_root / "unet_fsdp2" / "ema")
        error = {"type": None, "message": ""}
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        error = {"type": type(err).__name__, "message": str(err)}
    dist.barrier()  # the main process removes its temporary folder after the others have raised
    error["left"] = (
        sorted(p.name for p in (out_root / "unet_fsdp2").iterdir()) if (out_root / "unet_fsdp2").exists() else []
    )
    (out_root / f"unet_fsdp2_rank{dist.get_rank()}.json").write_text(json.dumps(error))
    dist.barrier()


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
    if importlib.util.find_spec("diffusers") is not None:
        unet_save_refused(out_root)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun worker: a bias-corrected EMA (BEMA) saved by 2 ranks resumes exactly at another world size.

Usage (gloo, CPU):

    torchrun --nproc_per_node 2 tests/dist/bema_worker.py train OUT_DIR fsdp2,ddp
    torchrun --nproc_per_node N tests/dist/bema_worker.py resume OUT_DIR fsdp2,ddp

`train`: 2 ranks train the model of `common.py` (FSDP2, or DDP with the EMA sharded across the ranks) with
`ModelEMA(bema=...)`, save the EMA at `SAVE_STEP` to `OUT_DIR/<mode>/mid` and at the end to `OUT_DIR/<mode>/final`,
and rank 0 writes the full weights of every step after `SAVE_STEP` to `OUT_DIR/<mode>/weights.safetensors`.

`resume`: N ranks restore `mid`, set the model to each recorded step's weights (the same values, whatever the
sharding) and update the EMA, then save to `OUT_DIR/<mode>/resumed<N>`; `tests/test_bema.py` checks that it is
`final` byte for byte (the EMA update is elementwise, so the world size changes no bit of it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LR, SAVE_STEP, STEPS, batches, build_model, rank_rows, train_step, wrap  # noqa: E402

from hf_ema import BEMAConfig, ModelEMA, load_ema, save_ema  # noqa: E402

#: Burn-in at step 2, so the mid-run save holds theta_0; updates every 2 steps with (1 - w_t) ** 2.
BEMA = BEMAConfig(tau=2, rho=3.0)
UPDATE_EVERY = 2


def build(mode: str):
    inner = build_model(seed=0)
    model = wrap(inner, mode)
    return inner, model, ModelEMA(model, bema=BEMA, update_every=UPDATE_EVERY)


def full_weights(inner, sharded: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in inner.named_parameters():  # full_tensor() is a collective: same order on every rank
        out[name] = (p.detach().full_tensor() if sharded else p.detach()).clone()
    return out


def train(out: Path, mode: str) -> None:
    inner, model, ema = build(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = batches()
    rank, world = dist.get_rank(), dist.get_world_size()
    recorded = {}
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, rank_rows(data[step - 1], rank, world))
        ema.update(step=step)
        if step == SAVE_STEP:
            save_ema(ema, out / mode / "mid")
        if step > SAVE_STEP:
            recorded.update({f"{step}/{n}": t for n, t in full_weights(inner, mode == "fsdp2").items()})
    save_ema(ema, out / mode / "final")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in recorded.items()}, str(out / mode / "weights.safetensors"))
    dist.barrier()
    ema.close()


@torch.no_grad()
def resume(out: Path, mode: str) -> None:
    inner, _, ema = build(mode)
    load_ema(ema, out / mode / "mid")
    weights = load_file(str(out / mode / "weights.safetensors"))
    params = dict(inner.named_parameters())
    for step in range(SAVE_STEP + 1, STEPS + 1):
        for name, p in params.items():
            full = weights[f"{step}/{name}"]
            if hasattr(p, "to_local"):  # FSDP2: this rank's rows, cut as the EMA's shards are
                local = p.to_local()
                local.copy_(ema.layout.shard_full_tensor(name, full, local))
            else:  # DDP: every rank holds the whole weights (its EMA, a chunk of them)
                p.copy_(full)
        ema.update(step=step)
    save_ema(ema, out / mode / f"resumed{dist.get_world_size()}")
    ema.close()


def main() -> None:
    action, out, modes = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for mode in modes:
            (train if action == "train" else resume)(out, mode)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun worker: an offloaded EMA sharded across two DDP ranks coalesces the same updates on both ranks, although
only one rank's background fold is slow.

Usage: `torchrun --nproc_per_node 2 tests/dist/coalescing_worker.py OUT_DIR skip|ignore` (gloo, CPU; the
`on_nonfinite` mode: with "ignore" the folds make no collective of their own, so nothing but the coalescing
agreement keeps rank 0, whose fold is fast, from folding at steps where rank 1 coalesces).

Rank 1's fold sleeps `SLOW_FOLD_S` before it folds (rank 0's does not), so only rank 1 is ever busy; each rank's
EMA holds its chunk of every tensor, so both must take the same intervals (and their background collectives must pair
up). Each rank writes the steps it folded and the interval of each; rank 0 writes every step's weights and the
gathered EMA for `tests/test_coalescing.py`, which recomputes the EMA from the weights at the fold steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LR, STEPS, batches, build_model, rank_rows, train_step, wrap  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_ema import ModelEMA  # noqa: E402

DECAY = 0.9
SLOW_FOLD_S = 0.4
STEPS_RUN = 3 * STEPS


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inner = build_model(seed=0)
    model = wrap(inner, "ddp")
    ema = ModelEMA(model, decay=DECAY, device="cpu", async_update=True, max_update_interval=8, on_nonfinite=mode)
    if rank == 1:
        offload = ema._updater.offload
        fold = offload._fold

        def slow_fold(*args):
            time.sleep(SLOW_FOLD_S)
            return fold(*args)

        offload._fold = slow_fold
    optimizer = torch.optim.SGD(model.parameters(), lr=LR / 10)
    data = batches()
    weights = {f"0/{n}": p.detach().clone() for n, p in inner.named_parameters()}
    folds = []
    for step in range(1, STEPS_RUN + 1):
        train_step(model, optimizer, rank_rows(data[(step - 1) % STEPS], rank, dist.get_world_size()))
        weights.update({f"{step}/{n}": p.detach().clone() for n, p in inner.named_parameters()})
        if ema.update():
            folds.append((step, ema.last_interval))
    before = ema.update_intervals
    full = ema.full_state_dict(dtype="ema")  # reads the EMA: folds the steps coalesced at the end
    if ema.update_intervals != before:
        folds.append((STEPS_RUN, ema.last_interval))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: full[n].contiguous() for n in ema.names}, str(out / "ema.safetensors"))
        save_file(weights, str(out / "weights.safetensors"))
    dist.barrier()
    info = {"folds": folds, "intervals": {str(k): v for k, v in ema.update_intervals.items()}, "decay": DECAY}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    ema.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun worker: the collectives of `hf_ema.sharding.collectives` on 2 CPU ranks (gloo), each rank with values of
its own. Usage: `torchrun --nproc_per_node 2 tests/dist/collectives_worker.py OUT_DIR`; each rank writes what it got
to `OUT_DIR/rank<r>.json`, and `tests/test_collectives.py` checks it against the values every rank had."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_ema.errors import CheckpointError
from hf_ema.sharding.collectives import (
    Ranks,
    all_gather_object,
    all_ranks_agree,
    all_reduce_sum,
    gather_concat,
    new_cpu_group,
    reduce_max_,
)
from hf_ema.sharding.detect import detect_layout


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {}
    result["agree_all_true"] = all_ranks_agree(True)
    result["agree_one_false"] = all_ranks_agree(rank == 0)
    result["agree_own_group"] = all_ranks_agree(rank == 1, group=new_cpu_group())
    flags = torch.tensor([rank == 1, False, rank == 0], dtype=torch.int32)
    same = reduce_max_(flags)
    result["reduce_max"] = flags.tolist()
    result["reduce_max_in_place"] = same is flags
    result["sum"] = all_reduce_sum([1.5 * (rank + 1), rank])
    result["objects"] = all_gather_object({"rank": rank})
    piece = torch.arange(3, dtype=torch.float32) + 10 * rank
    to_first = gather_concat(piece)
    result["gather_first"] = None if to_first is None else to_first.tolist()
    result["gather_all"] = gather_concat(piece, all_ranks=True).tolist()
    ranks = Ranks(detect_layout(torch.nn.Linear(2, 2)))
    result["on_main"] = ranks.on_main("count", lambda: {"n": 7})
    try:
        ranks.on_main("fail on purpose", lambda: 1 / 0)
    except (CheckpointError, ZeroDivisionError) as err:
        result["on_main_error"] = f"{type(err).__name__}: {err}"
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

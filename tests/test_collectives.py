"""`hf_ema.sharding.collectives`: the identity in one process, and across 2 CPU ranks the agreement, the device-side
maximum, sums, gathers and the main process's steps (its result, or its error on every rank)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_ema.sharding.collectives import all_gather_object, all_ranks_agree, all_reduce_sum, reduce_max_


def test_one_process_is_the_identity():
    assert all_ranks_agree(True) is True and all_ranks_agree(False) is False
    flags = torch.tensor([0, 1])
    assert reduce_max_(flags) is flags and flags.tolist() == [0, 1]
    assert all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert all_gather_object("x") == ["x"]


@pytest.mark.multiprocess
def test_collectives_across_two_ranks(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
    from launch import torchrun

    torchrun("collectives_worker.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["agree_all_true"] is True
        assert got["agree_one_false"] is False and got["agree_own_group"] is False
        # Rank 1 flagged element 0, rank 0 element 2: every rank ends with both flags, in the tensor it passed.
        assert got["reduce_max"] == [1, 0, 1] and got["reduce_max_in_place"] is True
        assert got["sum"] == [1.5 + 3.0, 1.0]
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["gather_all"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
        assert got["gather_first"] == ([0.0, 1.0, 2.0, 10.0, 11.0, 12.0] if r == 0 else None)
        assert got["on_main"] == {"n": 7}
    assert ranks[0]["on_main_error"] == "ZeroDivisionError: division by zero"
    assert ranks[1]["on_main_error"] == (
        "CheckpointError: the main process failed to fail on purpose: ZeroDivisionError: division by zero"
    )

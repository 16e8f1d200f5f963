"""torchrun worker: `EMACallback` under `Trainer` + DDP on CPU (gloo), with and without the DDP-sharded EMA.

Usage: `torchrun --nproc_per_node 2 tests/dist/trainer_ddp_worker.py OUT_DIR`. Three runs with the same seed and
data: A with the default EMA (sharded across the 2 ranks) and stability metrics, B with `shard_across_ranks=False`,
and C resuming A from `checkpoint-2`. Writes what it measured to `OUT_DIR/rank<r>.json`; `tests/test_sharding.py` checks it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DECAY, SEQ, TRAINER_ARGS, VOCAB, build_model  # noqa: E402

from hf_ema import EMACallback  # noqa: E402


def dataset(rows: int = 16, seed: int = 7):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out: Path, **overrides):
    """4 steps of DDP over gloo on CPU, saving every 2 steps (the arguments shared by the Trainer workers)."""
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), use_cpu=True, ddp_backend="gloo", **TRAINER_ARGS)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run(out: Path, callback: EMACallback, resume: str | None = None):
    from transformers import Trainer

    args = training_args(out)
    trainer = Trainer(
        model=build_model(seed=0),
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(rows=4, seed=8),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def eval_losses(trainer) -> list[list[float]]:
    """(eval_loss, eval_ema_loss) of every evaluation: the EMA is evaluated swapped into the model on all ranks."""
    return [[e["eval_loss"], e["eval_ema_loss"]] for e in trainer.state.log_history if "eval_ema_loss" in e]


def osc_logs(trainer) -> dict[str, list[float]]:
    """The oscillation metrics logged at each step (reduced over both ranks)."""
    return {
        str(e["step"]): [e["ema_osc_frac"], e["ema_osc_freq_mean"]]
        for e in trainer.state.log_history
        if "ema_osc_freq_mean" in e
    }


#: Stability metrics in runs A and C, to check that the per-rank oscillation state resumes exactly.
STABILITY = {"sample_size": 256, "momentum": 0.3, "threshold": 0.2}


def main() -> None:
    out = Path(sys.argv[1])
    from accelerate import PartialState

    state = PartialState()  # the Trainer would set up the process group the same way
    if state.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
    state.wait_for_everyone()
    res: dict = {"world_size": dist.get_world_size(), "backend": dist.get_backend()}

    sharded = EMACallback(decay=DECAY, stability_metrics=STABILITY)
    trainer_a = run(out / "A", sharded)
    res["A_osc"] = osc_logs(trainer_a)
    res["A_layout"] = sharded.ema.layout.kind
    res["A_ema_bytes"] = sharded.ema.num_bytes()
    res["A_local_numels"] = [t.numel() for t in sharded.ema.shadow]
    res["A_eval"] = eval_losses(trainer_a)

    full = EMACallback(decay=DECAY, shard_across_ranks=False)
    trainer_b = run(out / "B", full)
    res["B_eval"] = eval_losses(trainer_b)
    res["B_layout"] = full.ema.layout.kind
    res["B_ema_bytes"] = full.ema.num_bytes()

    resumed = EMACallback(decay=DECAY, stability_metrics=STABILITY)
    trainer_c = run(out / "C", resumed, resume=str(out / "A" / "checkpoint-2"))
    res["C_osc"] = osc_logs(trainer_c)
    res["C_step"] = resumed.ema.step
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
    # Tear the process group down before the interpreter exits: gloo's threads destroyed at exit can abort the
    # process ("terminate called without an active exception") after every check has passed.
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

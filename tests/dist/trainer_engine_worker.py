"""torchrun worker: `EMACallback` under a real `Trainer` with DeepSpeed ZeRO-3 or FSDP, on 2 CPU ranks (gloo).

Usage: `torchrun --nproc_per_node 2 tests/dist/trainer_engine_worker.py ENGINE OUT_DIR RUN[,RUN...]`, ENGINE
`zero3` (launched with `DS_ACCELERATOR=cpu`) or `fsdp`. Several runs share one launch (a DeepSpeed launch spends
about 10 s starting up). Every run trains the tiny Llama of `common.py` (a LoRA run: with adapters) for 4 optimizer
steps with the Trainer's AdamW, evaluating and checkpointing at steps 2 and 4:

- zero3: `plain`; `resume` (`plain` again from its `checkpoint-2`); `accum` (`gradient_accumulation_steps=2`);
  `lora`; `offload` (`offload_param` and `offload_optimizer` on `cpu`).
- fsdp: `guard` (FSDP arguments without the accelerate workaround: builds the Trainer and reports what accelerate
  did, no training); `fsdp2`, `fsdp1` and their `_resume` runs.

Each run writes to `OUT_DIR/<run>/`: `run/` (the Trainer's output folder), `raw-<k>.safetensors` (rank 0: the
trainable weights gathered from the engine after optimizer step k, `raw-0` before the first),
`ema.safetensors` (rank 0: the live EMA at the end, gathered by `ModelEMA.full_state_dict`), `rank<r>.json`
(layout, EMA bytes and step on that rank, the evaluations the Trainer logged). `tests/test_trainer_engines.py`
checks them against references it computes itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accelerate_cpu_workaround as workaround  # noqa: E402
from common import DECAY, LR, TRAINER_ARGS, build  # noqa: E402
from trainer_ddp_worker import dataset  # noqa: E402

from hf_ema import EMACallback  # noqa: E402


def eval_dataset():
    return dataset(rows=4, seed=8)


class RawWeights(TrainerCallback):
    """Gathers the full trainable weights from the engine on every rank (a collective), at the start of training
    and after every optimizer step, and saves them on rank 0 as `raw-<step>.safetensors`."""

    def __init__(self, engine: str, out: Path) -> None:
        self.engine, self.out, self.trainer = engine, out, None

    def _gather(self) -> dict[str, torch.Tensor]:
        model = self.trainer.model
        if self.engine == "zero3":
            import deepspeed

            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return {n: p.detach().clone().float() for n, p in params}
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            # (A full state dict of an FSDP1 model segfaults inside torch on CPU; summoning the parameters works.)
            with FSDP.summon_full_params(model, writeback=False):
                return {
                    n.replace("_fsdp_wrapped_module.", ""): p.detach().clone().float()
                    for n, p in model.named_parameters()
                }
        return {n: p.full_tensor().detach().clone().float() for n, p in model.named_parameters()}

    def _record(self, step: int) -> None:
        from safetensors.torch import save_file

        weights = self._gather()
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(self.out / f"raw-{step}.safetensors"))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._record(0)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


def train(engine: str, name: str, out: Path, resume: str | None = None) -> None:
    """One run: build the model first (see `workaround.zero3_args`), then the arguments, then the Trainer."""
    from safetensors.torch import save_file
    from transformers import Trainer

    folder = out / name
    base = name.removesuffix("_resume")
    overrides = dict(TRAINER_ARGS)
    if name == "accum":
        overrides.update(gradient_accumulation_steps=2, per_device_train_batch_size=1)
    if engine == "zero3":
        workaround.forget_deepspeed_config()
        model = build("lora_" if name == "lora" else "full", seed=0)
        args = workaround.zero3_args(str(folder / "run"), offload=name == "offload", **overrides)
    else:
        if base == "fsdp1":
            # accelerate's FSDP1 sharded optimizer checkpoint restores no AdamW state (it loads into the template
            # `FSDP.optim_state_dict` of an optimizer that has not stepped yet, which is empty), so an FSDP1 run
            # resumed with AdamW diverges whatever the EMA does. SGD has no state: the engine resumes exactly (with
            # the larger step of `common.LR`, so the EMA is well apart from the raw weights at each evaluation).
            overrides.update(optim="sgd", learning_rate=LR)
        model = build("full", seed=0)
        args = workaround.fsdp_args(str(folder / "run"), 2 if base == "fsdp2" else 1, **overrides)
        workaround.force_fsdp_on_cpu()
    callback = EMACallback(decay=DECAY)
    recorder = RawWeights(engine, folder)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        eval_dataset=eval_dataset(),
        callbacks=[callback, recorder],
    )
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    ema = callback.ema.full_state_dict(dtype="ema")
    rank = dist.get_rank()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    evals = [
        [e["step"], e["eval_loss"], e["eval_ema_loss"], e["eval_ema_is_raw"]]
        for e in trainer.state.log_history
        if "eval_ema_loss" in e
    ]
    info = {
        "layout": callback.ema.layout.kind,
        "ema_bytes": callback.ema.num_bytes(),
        "ema_step": callback.ema.step,
        "global_step": trainer.state.global_step,
        "evals": evals,
        "world_size": dist.get_world_size(),
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(info, indent=1))
    dist.barrier()


def guard(out: Path) -> None:
    """What accelerate does with FSDP arguments on CPU ranks without the workaround, for each FSDP version."""
    folder = out / "guard"
    res = {
        f"fsdp{v}": workaround.fsdp_without_workaround(str(folder / "run"), v, build("full", seed=0), dataset())
        for v in (2, 1)
    }
    (folder / f"rank{dist.get_rank()}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()


def main() -> None:
    engine, out, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    if engine == "zero3":
        workaround.deepspeed_cpu_state()
    for name in runs:
        (out / name).mkdir(parents=True, exist_ok=True)
    for name in runs:
        if name == "guard":
            guard(out)
            continue
        resume = None
        if name.endswith("resume"):
            source = "plain" if name == "resume" else name.removesuffix("_resume")
            resume = str(out / source / "run" / "checkpoint-2")
        train(engine, name, out, resume)


if __name__ == "__main__":
    main()
    # Tear the process group down before the interpreter exits: gloo's threads destroyed at exit can abort the
    # process ("terminate called without an active exception") after every check has passed.
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

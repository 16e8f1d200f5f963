"""torchrun worker: `EMACallback` under `Trainer` + DeepSpeed ZeRO-3 (needs CUDA GPUs and `deepspeed`).

Usage: `torchrun --nproc_per_node N tests/dist/zero3_trainer_worker.py OUT_DIR`. Trains the tiny Llama of
`common.py` in fp32 for 4 steps with a checkpoint after every step (the Trainer gathers the raw weights into each
`checkpoint-k/`), and the EMA written to `checkpoint-4/ema/`. Rank 0 also saves the initial weights; every rank
writes its EMA bytes to `OUT_DIR/rank<r>.json`. `tests/test_sharding.py::test_zero3_trainer_real_deepspeed`
rebuilds the EMA from the initial weights and the raw checkpoints and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DECAY, build_model  # noqa: E402
from trainer_ddp_worker import dataset  # noqa: E402

from hf_ema import EMACallback  # noqa: E402

DEEPSPEED_ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        # Partition every parameter (none kept whole), so each rank's EMA is its 1/N partition.
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
}


def main() -> None:
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments

    out = Path(sys.argv[1])
    initial = {k: v.detach().clone().contiguous() for k, v in build_model(seed=0).state_dict().items()}
    args = TrainingArguments(
        output_dir=str(out / "run"),
        deepspeed=DEEPSPEED_ZERO3,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        save_steps=1,
        logging_steps=1,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    callback = EMACallback(decay=DECAY, eval_ema=False)
    trainer = Trainer(model=build_model(seed=0), args=args, train_dataset=dataset(), callbacks=[callback])
    trainer.train()
    rank = dist.get_rank()
    if rank == 0:
        save_file({k: v for k, v in initial.items() if k != "lm_head.weight"}, str(out / "initial.safetensors"))
    full_bytes = sum(v.numel() * 4 for k, v in initial.items() if k != "lm_head.weight" and v.is_floating_point())
    info = {"layout": callback.ema.layout.kind, "ema_bytes": callback.ema.num_bytes(), "full_bytes": full_bytes}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

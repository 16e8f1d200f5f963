"""A tiny Trainer + EMACallback run that the crash tests kill (SIGKILL) and resume.

`python tests/_crash_worker.py OUT DATA_DIR [--kill MODE:STEP]`: trains the tiny Llama for `MAX_STEPS` steps,
saving every `SAVE_STEPS` (keeping 2 checkpoints), resuming with `resume_from_checkpoint=True` whenever OUT holds a
checkpoint. It prints `TRAINING` when the first step starts. `--kill` kills the process itself at a chosen point:

- `window:N`: right after the Trainer wrote `checkpoint-N/`, before `checkpoint-N/ema/` exists;
- `tmp:N`: while the EMA of step N is complete in `.ema.tmp-*` but not yet renamed to `ema/`.

A resume that cannot restore the EMA exactly ends with exit code 3 and the error on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

MAX_STEPS = 24
SAVE_STEPS = 4


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("data")
    parser.add_argument("--kill", default=None)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback

    sys.path.insert(0, str(Path(__file__).parent))
    from _trainer_args import cpu_args

    from hf_ema import CheckpointError, EMACallback
    from hf_ema.demo.toy import tiny_causal_lm
    from hf_ema.utils import atomic

    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.data)
    blocks = load_file(os.path.join(args.data, "blocks.safetensors"))["input_ids"]
    train = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in blocks]
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)

    class Announce(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if not getattr(self, "said", False):
                print("TRAINING", flush=True)
                self.said = True

    trainer = Trainer(
        model=model,
        args=cpu_args(
            args.out,
            max_steps=MAX_STEPS,
            save_steps=SAVE_STEPS,
            save_total_limit=2,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            logging_steps=1000,
        ),
        train_dataset=train,
        callbacks=[EMACallback(decay=0.9), Announce()],
    )

    if args.kill:
        mode, step = args.kill.split(":")
        step = int(step)
        if mode == "window":
            original = trainer._save_checkpoint

            def save_checkpoint(*a, **k):
                original(*a, **k)
                if trainer.state.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            trainer._save_checkpoint = save_checkpoint
        elif mode == "tmp":
            original_commit = atomic.commit_folder

            def commit_folder(tmp, path):
                if Path(path).name == "ema" and Path(path).parent.name == f"checkpoint-{step}":
                    os.kill(os.getpid(), signal.SIGKILL)
                original_commit(tmp, path)

            atomic.commit_folder = commit_folder
        else:
            raise SystemExit(f"unknown --kill mode {mode!r}")

    resume = (
        any(p.name.startswith("checkpoint-") for p in Path(args.out).iterdir()) if Path(args.out).is_dir() else False
    )
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    except CheckpointError as exc:
        print(f"CheckpointError: {exc}", file=sys.stderr, flush=True)
        return 3
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

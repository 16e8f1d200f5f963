"""Train a tiny causal LM with `Trainer` + `EMACallback` under any `accelerate launch` / `torchrun` set-up.

GPUs (pick a config from `examples/configs/`):

    accelerate launch --config_file examples/configs/fsdp2.yaml examples/multi_gpu_train.py --output-dir out

2 CPU processes (DDP over gloo, what runs without a GPU):

    torchrun --nproc_per_node 2 examples/multi_gpu_train.py --cpu --output-dir out

The EMA is written to `out/checkpoint-N/ema/` and `out/ema/` (load it with `from_pretrained`); each rank holds only
its shard of the EMA (DDP: 1/N of each tensor; FSDP / ZeRO-3: the EMA of its own parameter shards).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description="Trainer + EMACallback on a tiny offline model, multi-process.")
    parser.add_argument("--output-dir", default="multi_gpu_out")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU (gloo); FSDP and ZeRO-3 need GPUs.")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--no-shard-ema", action="store_true", help="Under DDP keep a full EMA on every rank.")
    args = parser.parse_args()

    from transformers import Trainer, TrainingArguments

    from hf_ema import EMACallback
    from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer

    tokenizer = train_tokenizer(vocab_size=512)
    train, _ = lm_datasets(tokenizer, block_size=32, max_train_blocks=256)
    model = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_steps=max(1, args.max_steps // 2),
        logging_steps=5,
        report_to=[],
        use_cpu=args.cpu,
        ddp_backend="gloo" if args.cpu else None,
    )
    callback = EMACallback(decay=args.decay, shard_across_ranks=False if args.no_shard_ema else None)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback])
    trainer.train()
    ema = callback.ema
    if trainer.is_world_process_zero():
        print(f"EMA layout: {ema.layout.kind}; this rank holds {ema.num_bytes() / 2**20:.2f} MiB of EMA")


if __name__ == "__main__":
    main()

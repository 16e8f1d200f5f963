"""Full fine-tuning of a causal LM with an EMA of its weights.

Offline by default: a tiny Llama built from a config and a byte-level BPE tokenizer trained on the text of
`pydoc_data.topics` (ships with Python). With a network, pass any Hub model instead:

    python examples/finetune_causal_lm.py                                   # offline tiny model
    python examples/finetune_causal_lm.py --model Qwen/Qwen2.5-0.5B --bf16  # a real Hub model

The EMA ends up in `OUTPUT_DIR/ema/` (and `OUTPUT_DIR/checkpoint-N/ema/`), loadable with `from_pretrained`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_ema import EMACallback
from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub model id or local path (default: offline tiny Llama)")
    parser.add_argument("--output-dir", default="runs/finetune")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (the EMA stays fp32)")
    args = parser.parse_args(argv)

    if args.model is None:
        tokenizer = train_tokenizer()
        model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else None)
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=args.block_size)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=min(20, args.max_steps // 10),
        logging_steps=20,
        save_steps=max(1, args.max_steps // 2),
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 2),
        bf16=args.bf16,
        report_to=[],
    )
    ema = EMACallback(decay=args.decay)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[ema],
    )
    trainer.train()
    # EMACallback(eval_ema=True), the default, evaluates the EMA beside the raw weights in the same pass.
    metrics = trainer.evaluate()
    raw, ema_loss = metrics["eval_loss"], metrics["eval_ema_loss"]
    ema_model = AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/ema")
    print(f"EMA weights in {args.output_dir}/ema ({sum(p.numel() for p in ema_model.parameters()):,} parameters)")
    print(f"eval loss: raw {raw:.4f}  EMA {ema_loss:.4f}")
    return {"eval_loss": raw, "eval_ema_loss": ema_loss, "ema": ema.ema, "ema_dir": f"{args.output_dir}/ema"}


if __name__ == "__main__":
    main()

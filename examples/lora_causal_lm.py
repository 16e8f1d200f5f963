"""LoRA fine-tuning with an EMA of the adapter weights only.

    pip install ".[examples]"                                          # in a clone of hf-ema (adds peft)
    python examples/lora_causal_lm.py                                  # offline tiny model
    python examples/lora_causal_lm.py --model Qwen/Qwen2.5-0.5B        # a real Hub model

The EMA adapter lands in `OUTPUT_DIR/ema/` and loads with `PeftModel.from_pretrained(base, OUTPUT_DIR + "/ema")`.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_ema import EMACallback
from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer


def _base_model(name, tokenizer):
    if name is None:
        return tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4, seed=0)
    return AutoModelForCausalLM.from_pretrained(name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub model id or local path (default: offline tiny Llama)")
    parser.add_argument("--output-dir", default="runs/lora")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    args = parser.parse_args(argv)

    if args.model is None:
        tokenizer = train_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(_base_model(args.model, tokenizer), lora)
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=64)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=20,
        save_steps=max(1, args.max_steps // 2),
        report_to=[],
    )
    callback = EMACallback(decay=args.decay)  # only the adapter (trainable) weights are averaged
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    raw = trainer.evaluate()["eval_loss"]
    ema_model = PeftModel.from_pretrained(_base_model(args.model, tokenizer), f"{args.output_dir}/ema")
    ema_trainer = Trainer(model=ema_model, args=training_args, eval_dataset=eval_ds, processing_class=tokenizer)
    ema_loss = ema_trainer.evaluate()["eval_loss"]
    print(f"EMA adapter in {args.output_dir}/ema")
    print(f"eval loss: raw {raw:.4f}  EMA {ema_loss:.4f}")
    return {"eval_loss": raw, "eval_ema_loss": ema_loss, "ema": callback.ema, "ema_dir": f"{args.output_dir}/ema"}


if __name__ == "__main__":
    main()

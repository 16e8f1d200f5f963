"""Real short Trainer runs with EMACallback, shared by the serve tests (test_serve_*.py)."""

from __future__ import annotations

from pathlib import Path


def train_run(
    out_dir: Path,
    tokenizer,
    lm_data,
    *,
    lora: bool = False,
    steps: int = 8,
    save_steps: int = 4,
    posthoc: bool = False,
    max_positions: int = 256,
    bema: bool = False,
) -> Path:
    """Train a tiny Llama (or a LoRA adapter on it) with EMACallback; checkpoints every `save_steps`, then
    `trainer.save_model()`. For LoRA the base model is saved to `out_dir/base_model` and loaded from there first, so
    the adapter records where its base is (as a Hub model's adapter would). `posthoc=True` also keeps post-hoc EMA
    snapshots (`EMACallback(posthoc=True)`, one per checkpoint) in `out_dir/ema_posthoc`. `max_positions` is the
    model's context length. `bema=True` keeps a bias-corrected EMA (burn-in at step 2) instead of the plain one.

    A high learning rate and a short EMA horizon make the raw and EMA weights clearly different.
    """
    import torch
    from _trainer_args import cpu_args
    from transformers import AutoModelForCausalLM, Trainer

    from hf_ema import EMACallback
    from hf_ema.demo.toy import tiny_causal_lm

    train, evaluation = lm_data
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, max_positions=max_positions, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        base_dir = out_dir / "base_model"
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        # init_lora_weights=False: B starts non-zero, so even a few steps give adapters that change the output.
        model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
    torch.manual_seed(0)
    args = cpu_args(
        out_dir,
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=5e-2 if lora else 1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_steps=save_steps,
        eval_strategy="steps",
        eval_steps=save_steps,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation.select(range(16)),
        processing_class=tokenizer,
        callbacks=[EMACallback(bema={"tau": 2}) if bema else EMACallback(decay=0.7, posthoc=posthoc)],
    )
    trainer.train()
    trainer.save_model(str(out_dir))
    return out_dir

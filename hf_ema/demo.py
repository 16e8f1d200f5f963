"""The project's main job on a fresh machine: train the tiny offline model with `EMACallback`.

Used by `hf-ema demo` (and the README's first command). Skips training when the run folder already holds a
finished run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_NAME", "train_tiny_run"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "hf_ema_demo.json"


def train_tiny_run(
    output_dir: str | os.PathLike = "runs/tiny",
    max_steps: int = 300,
    decay: float = 0.99,
    seed: int = 0,
    lora: bool = False,
    save_steps: int = 100,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tiny Llama on the bundled corpus with `EMACallback`, evaluate raw and EMA weights.

    Args:
        output_dir (`str`, *optional*, defaults to `"runs/tiny"`): The run folder.
        max_steps (`int`, *optional*, defaults to 300): Optimizer steps.
        decay (`float`, *optional*, defaults to 0.99): EMA decay.
        seed (`int`, *optional*, defaults to 0): Seed.
        lora (`bool`, *optional*, defaults to `False`): Train a LoRA adapter instead of the full model.
        save_steps (`int`, *optional*, defaults to 100): Checkpoint interval.
        force (`bool`, *optional*, defaults to `False`): Train again even when a finished run is there.
        progress (`bool`, *optional*, defaults to `True`): Show the Trainer's progress bar.

    Returns:
        `dict`: `output_dir`, `ema_dir`, `checkpoints`, `eval_loss`, `eval_ema_loss`, `trained` (False if skipped).
    """
    output_dir = Path(output_dir)
    results_path = output_dir / RESULTS_NAME
    if results_path.is_file() and (output_dir / "ema" / "ema_state.json").is_file() and not force:
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
        results["trained"] = False
        return results

    import torch
    from transformers import Trainer, TrainingArguments

    from .callback import EMACallback
    from .offline import lm_datasets, tiny_causal_lm, train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=64)
    model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4, num_heads=4, seed=seed)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3 if lora else 2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=20,
        logging_steps=25,
        save_steps=save_steps,
        eval_strategy="steps",
        eval_steps=save_steps,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=not progress,
    )
    callback = EMACallback(decay=decay)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    raw = trainer.evaluate()
    with callback.ema.swapped():
        ema = trainer.evaluate(metric_key_prefix="eval_ema")
    results = {
        "output_dir": str(output_dir),
        "ema_dir": str(output_dir / "ema"),
        "checkpoints": sorted(str(p) for p in output_dir.glob("checkpoint-*")),
        "eval_loss": raw["eval_loss"],
        "eval_ema_loss": ema["eval_ema_loss"],
        "max_steps": max_steps,
        "decay": decay,
        "lora": lora,
    }
    trainer.save_model(str(output_dir))
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    results["trained"] = True
    return results

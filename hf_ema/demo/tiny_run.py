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

from ..errors import ConfigError

__all__ = ["DEFAULT_DECAY", "DEFAULT_MAX_STEPS", "RESULTS_NAME", "train_tiny_run"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "hf_ema_demo.json"
# Tuned so that, in a few minutes on 2 CPU cores, greedy generations are words rather than noise and the EMA's
# eval loss is clearly below the raw weights' (see the README section "Try it" for the measured figures).
DEFAULT_MAX_STEPS = 600
DEFAULT_DECAY = 0.98
DEFAULT_LR = 3e-3
# Small batches keep the raw weights noisy at a constant learning rate: the noise the EMA averages out.
DEFAULT_BATCH_SIZE = 8


def train_tiny_run(
    output_dir: str | os.PathLike = "runs/tiny",
    max_steps: int = DEFAULT_MAX_STEPS,
    decay: float = DEFAULT_DECAY,
    seed: int = 0,
    lora: bool = False,
    save_steps: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tiny Llama on the bundled corpus with `EMACallback`, evaluating raw and EMA weights as it goes.

    The learning rate is held constant after a short warmup: the raw weights keep bouncing around the optimum
    while the EMA averages the bounce out, so the EMA's eval loss ends clearly lower (a decaying learning rate does
    much of the EMA's job). Checkpoints (each with `ema/`) and evaluations (`eval_loss` and `eval_ema_loss`) every
    `save_steps`; the final raw model and tokenizer in `output_dir`, the final EMA in `output_dir/ema`. For LoRA
    the base model is saved to `output_dir/base_model` first so that the adapters name their base.

    Args:
        output_dir (`str`, *optional*, defaults to `"runs/tiny"`): The run folder.
        max_steps (`int`, *optional*, defaults to `DEFAULT_MAX_STEPS`): Optimizer steps.
        decay (`float`, *optional*, defaults to `DEFAULT_DECAY`): EMA decay.
        seed (`int`, *optional*, defaults to 0): Seed.
        lora (`bool`, *optional*, defaults to `False`): Train a LoRA adapter instead of the full model.
        save_steps (`int`, *optional*): Checkpoint and evaluation interval; defaults to a sixth of `max_steps`.
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
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"`max_steps` must be an int >= 1, got {max_steps!r}")
    if save_steps is None:
        save_steps = max(1, max_steps // 6)
    if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1:
        raise ConfigError(f"`save_steps` must be an int >= 1, got {save_steps!r}")

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from ..trainer.callback import EMACallback
    from .toy import lm_datasets, tiny_causal_lm, train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=64)
    model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4, num_heads=4, seed=seed)
    if lora:
        from peft import LoraConfig, get_peft_model

        # A LoRA checkpoint holds only the adapter: keep the (random, frozen) base where the adapter can name it.
        base_dir = (output_dir / "base_model").resolve()
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=DEFAULT_BATCH_SIZE,
        per_device_eval_batch_size=32,
        learning_rate=DEFAULT_LR * (1.5 if lora else 1.0),
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, max_steps // 10),
        logging_steps=max(1, min(25, save_steps)),
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
    # EMACallback evaluates the EMA beside the raw weights; evaluate once more unless the last step just did.
    last = next((e for e in reversed(trainer.state.log_history) if "eval_ema_loss" in e), None)
    if last is None or last.get("step") != trainer.state.global_step:
        last = trainer.evaluate()
    results = {
        "output_dir": str(output_dir),
        "ema_dir": str(output_dir / "ema"),
        "checkpoints": sorted(str(p) for p in output_dir.glob("checkpoint-*")),
        "eval_loss": last["eval_loss"],
        "eval_ema_loss": last["eval_ema_loss"],
        "max_steps": max_steps,
        "decay": decay,
        "lora": lora,
    }
    trainer.save_model(str(output_dir))
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    results["trained"] = True
    return results

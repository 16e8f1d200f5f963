"""The project's main job on a fresh machine: train the tiny offline model with `EMACallback`.

Used by `hf-ema demo` (and the README's first command). Skips training when the run folder already holds a
finished run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import require_extra
from ..utils.jsonio import read_json, write_json
from ..utils.output import mark_output, prepare_output
from ..utils.paths import EMA_DIRNAME, STATE_NAME
from ..utils.validation import check_int

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


def _run_paths(output_dir: Path) -> dict[str, Any]:
    """The run's folder, its final EMA folder and its checkpoints, as `train_tiny_run` reports them."""
    return {
        "output_dir": str(output_dir),
        "ema_dir": str(output_dir / EMA_DIRNAME),
        "checkpoints": sorted(str(p) for p in output_dir.glob("checkpoint-*")),
    }


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
    `save_steps`; post-hoc EMA snapshots (`EMACallback(posthoc=True)`) in `output_dir/ema_posthoc`; the final raw
    model and tokenizer in `output_dir`, the final EMA in `output_dir/ema`. For LoRA
    the base model is saved to `output_dir/base_model` first so that the adapters name their base.

    Args:
        output_dir (`str`, *optional*, defaults to `"runs/tiny"`): The run folder.
        max_steps (`int`, *optional*, defaults to `DEFAULT_MAX_STEPS`): Optimizer steps.
        decay (`float`, *optional*, defaults to `DEFAULT_DECAY`): EMA decay.
        seed (`int`, *optional*, defaults to 0): Seed.
        lora (`bool`, *optional*, defaults to `False`): Train a LoRA adapter instead of the full model.
        save_steps (`int`, *optional*): Checkpoint and evaluation interval; defaults to a sixth of `max_steps`.
        force (`bool`, *optional*, defaults to `False`): Train again even when a finished run is there, replacing
            it. Only a folder hf-ema wrote (a demo run, with its marker file) is ever replaced; any other non-empty
            folder is refused.
        progress (`bool`, *optional*, defaults to `True`): Show the Trainer's progress bar.

    Returns:
        `dict`: `output_dir`, `ema_dir`, `checkpoints`, `eval_loss`, `eval_ema_loss`, `trained` (False if skipped).
    """
    output_dir = Path(output_dir)
    finished = _finished_results(output_dir)
    if finished is not None and not force:
        return finished
    check_int("max_steps", max_steps, minimum=1)
    if save_steps is None:
        save_steps = max(1, max_steps // 6)
    check_int("save_steps", save_steps, minimum=1)
    if lora:
        require_extra("peft", "peft", "a LoRA demo run (`lora=True`)")
    _fresh_run_folder(output_dir, replace=force or finished is None)
    trainer = _build_trainer(output_dir, max_steps, decay, seed, lora, save_steps, progress)
    trainer.train()
    # EMACallback evaluates the EMA beside the raw weights; evaluate once more unless the last step just did.
    last = next((e for e in reversed(trainer.state.log_history) if "eval_ema_loss" in e), None)
    if last is None or last.get("step") != trainer.state.global_step:
        last = trainer.evaluate()
    results = {
        **_run_paths(output_dir),
        "eval_loss": last["eval_loss"],
        "eval_ema_loss": last["eval_ema_loss"],
        "max_steps": max_steps,
        "decay": decay,
        "lora": lora,
    }
    trainer.save_model(str(output_dir))
    write_json(output_dir / RESULTS_NAME, results)
    results["trained"] = True
    return results


def _finished_results(output_dir: Path) -> dict[str, Any] | None:
    """The results of a finished run in `output_dir` (`trained=False`), or `None` when there is none."""
    results_path = output_dir / RESULTS_NAME
    if not (results_path.is_file() and (output_dir / EMA_DIRNAME / STATE_NAME).is_file()):
        return None
    try:
        results = dict(read_json(results_path))
    except (OSError, TypeError, ValueError):  # a garbled results file: the run is trained again
        return None
    # The paths of where the run is now (the results file keeps those of where it was trained).
    results.update(_run_paths(output_dir), trained=False)
    return results


def _fresh_run_folder(output_dir: Path, replace: bool) -> None:
    # Only a run folder hf-ema wrote (its marker) is replaced: with `force`, or when its run never finished.
    prepare_output(output_dir, overwrite=replace, what="`output_dir`", overwrite_arg="force", allow_run_folder=True)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    mark_output(output_dir, "demo")


def _build_trainer(
    output_dir: Path, max_steps: int, decay: float, seed: int, lora: bool, save_steps: int, progress: bool
) -> Any:
    """The Trainer of the demo run: the tiny Llama (or a LoRA adapter on it) with `EMACallback(posthoc=True)`."""
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
    # Post-hoc snapshots (EDM2) at every checkpoint: the app can then show the EMA of any width, reconstructed
    # on demand (`hf-ema posthoc`), beside the raw weights, the EMA and merges of the last checkpoints.
    callback = EMACallback(decay=decay, posthoc=True)
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )

"""`EMACallback`: a thin `TrainerCallback` that drives a `ModelEMA` and writes `ema/` into every checkpoint."""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .config import EMAConfig
from .errors import ConfigTypeError
from .model_ema import ModelEMA
from .selection import select_tensors, unwrap_model
from .serialization import EMA_DIRNAME, load_ema, save_ema

__all__ = ["EMACallback"]

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"


def _find_calling_trainer() -> Trainer | None:
    """The `Trainer` whose `__init__` is calling us (callbacks are not handed the trainer itself)."""
    frame = inspect.currentframe()
    try:
        for _ in range(12):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


class EMACallback(TrainerCallback):
    """Keep an EMA of the model's weights during `Trainer.train` and save it as `ema/` in every checkpoint.

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[EMACallback(decay=0.999)])
    trainer.train()
    ema_model = AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/ema")
    ```

    The EMA is updated once per optimizer step (after gradient accumulation), kept in fp32 whatever the training
    dtype, written atomically by the main process into `checkpoint-N/ema/` and, at the end of training, into
    `output_dir/ema/`. Resuming with `trainer.train(resume_from_checkpoint=...)` restores it exactly.

    Args:
        config (`EMAConfig`, *optional*): The EMA configuration; built from `**kwargs` when not given.
        resume_from (`str`, *optional*): A checkpoint folder (or its `ema/`) to restore the EMA from when training
            resumes. Defaults to `output_dir/checkpoint-<global_step>`, the folder the Trainer resumes from.
        save_final (`bool`, *optional*, defaults to `True`): Write `output_dir/ema/` when training ends.
        **kwargs: Fields of [`EMAConfig`] (`decay`, `half_life`, `update_every`, ...).
    """

    def __init__(
        self,
        config: EMAConfig | None = None,
        *,
        resume_from: str | os.PathLike | None = None,
        save_final: bool = True,
        **kwargs: Any,
    ) -> None:
        if config is None:
            config = EMAConfig(**kwargs)
        elif kwargs:
            raise ConfigTypeError(f"pass either `config` or config fields, not both; got extra {sorted(kwargs)!r}")
        if not isinstance(config, EMAConfig):
            raise ConfigTypeError(f"`config` must be an EMAConfig, got {type(config).__name__}")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise ConfigTypeError(f"`resume_from` must be a path, got {resume_from!r}")
        self.config = config
        self.resume_from = resume_from
        self.save_final = save_final
        self.ema: ModelEMA | None = None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ wiring
    @property
    def trainer(self) -> Trainer | None:
        """The Trainer this callback was attached to, when it could be found."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    def bind(self, trainer: Trainer) -> EMACallback:
        """Attach to `trainer` explicitly (done automatically when the callback is passed to `Trainer(...)`).

        Args:
            trainer (`Trainer`): The trainer.
        """
        self._trainer_ref = weakref.ref(trainer)
        handler = trainer.callback_handler
        # Run first among callbacks so the values we add to `logs` reach TensorBoard / W&B in the same entry.
        if self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        return self

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer = _find_calling_trainer()
        if trainer is not None:
            self.bind(trainer)
        model = kwargs.get("model")
        if model is not None:
            # Fail on patterns that match nothing now, not after the first steps.
            select_tensors(unwrap_model(model), self.config)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        self.ema = ModelEMA(model, self.config)
        self.ema.step = state.global_step
        if state.global_step > 0:
            self._restore(args, state)

    # ------------------------------------------------------------------ resume
    def _resume_candidates(self, args: TrainingArguments, state: TrainerState) -> list[Path]:
        out = []
        if self.resume_from is not None:
            out.append(Path(self.resume_from))
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            out.append(Path(args.resume_from_checkpoint))
        out.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return out

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        for candidate in self._resume_candidates(args, state):
            folder = candidate if (candidate / "ema_state.json").is_file() else candidate / EMA_DIRNAME
            if (folder / "ema_state.json").is_file():
                meta = load_ema(self.ema, folder)
                if meta["step"] != state.global_step:
                    logger.warning(
                        "EMA restored from %s is at step %s but training resumes at step %s",
                        folder,
                        meta["step"],
                        state.global_step,
                    )
                logger.info("EMA restored from %s (step %s)", folder, meta["step"])
                return
        logger.warning(
            "Resuming at step %s but no EMA was found in %s: the EMA restarts from the current weights.",
            state.global_step,
            ", ".join(str(c) for c in self._resume_candidates(args, state)),
        )

    # ------------------------------------------------------------------ training events
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # on_step_end fires once per optimizer step, after gradient accumulation, with global_step incremented.
        self.ema.update(step=state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self.ema is None or logs is None or "loss" not in logs or self.ema.last_decay is None:
            return
        extra = {"ema_decay": float(self.ema.last_decay)}
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history before calling us: add our values there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir() and args.should_save:
            logger.warning("Checkpoint folder %s not found; EMA not saved for this step", folder)
            return
        self.save(folder / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.ema is None or not self.save_final:
            return
        self.save(Path(args.output_dir) / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state)

    # ------------------------------------------------------------------ API
    def save(self, folder: str | os.PathLike, processing_class: Any | None = None, state: TrainerState | None = None):
        """Write the EMA to `folder` (a collective call under distributed training).

        Args:
            folder (`str` or `os.PathLike`): The `ema/` folder to write.
            processing_class (*optional*): Tokenizer / processor saved beside the weights.
            state (`TrainerState`, *optional*): Used to record the global step.
        """
        extra = {"global_step": state.global_step} if state is not None else None
        return save_ema(self.ema, folder, processing_class=processing_class, extra_state=extra)

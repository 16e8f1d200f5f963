"""`EMACallback`: a thin `TrainerCallback` that drives a `ModelEMA` and writes `ema/` into every checkpoint."""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..compat.transformers import find_calling_trainer, wrap_train
from ..config import EMAConfig
from ..ema_folder import load_ema, save_ema
from ..errors import ConfigTypeError
from ..model_ema import ModelEMA
from ..posthoc import PostHocConfig, PostHocEMA, resolve_posthoc
from ..selection import select_tensors, unwrap_model
from ..stability import StabilityConfig, StabilityMonitor
from ..utils.paths import EMA_DIRNAME, STABILITY_DIRNAME, checkpoint_dir
from .evaluation import EMAEvaluator
from .hub_push import (
    PushSteps,
    after_checkpoint_save,
    install_checkpoint_push_hook,
    prepare_trainer_push,
    wait_for_pushes,
)
from .swap_at_end import make_ema_final

__all__ = ["EMACallback"]

logger = logging.getLogger(__name__)


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
        eval_ema (`bool`, *optional*, defaults to `True`): Whenever the Trainer evaluates, also evaluate the EMA
            (swapped in place) and log `eval_ema_loss` and every `compute_metrics` key with an `eval_ema_` prefix in
            the same entry; see [`EMAEvaluator`]. Costs one more evaluation pass.
        stability_metrics (`bool`, `dict` or `StabilityConfig`, *optional*, defaults to `False`): Log
            `ema_rel_distance`, `ema_osc_frac` and `ema_osc_freq_mean` at the logging steps; see
            [`StabilityConfig`].
        swap_at_end (`bool`, *optional*, defaults to `False`): When training ends, write the raw weights to
            `output_dir/raw/` and copy the EMA into the model, so `trainer.save_model()` and
            `trainer.push_to_hub()` publish the EMA (with `load_best_model_at_end`, the best checkpoint's EMA).
        posthoc (`bool`, `dict` or `PostHocConfig`, *optional*): Also keep EDM2 power-function EMAs (sigma_rel 0.05
            and 0.10 by default) and snapshot them into `output_dir/ema_posthoc/`, so `hf_ema.reconstruct` /
            `hf-ema posthoc` can build the EMA of any width after training; see [`PostHocConfig`].
        **kwargs: Fields of [`EMAConfig`] (`decay`, `half_life`, `update_every`, ...).
    """

    def __init__(
        self,
        config: EMAConfig | None = None,
        *,
        resume_from: str | os.PathLike | None = None,
        save_final: bool = True,
        eval_ema: bool = True,
        stability_metrics: bool | dict | StabilityConfig = False,
        swap_at_end: bool = False,
        posthoc: bool | dict | PostHocConfig | None = None,
        **kwargs: Any,
    ) -> None:
        config = EMAConfig.resolve(config, kwargs)
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise ConfigTypeError(f"`resume_from` must be a path, got {resume_from!r}")
        self.config = config
        self.resume_from = resume_from
        self.save_final = save_final
        self.ema: ModelEMA | None = None
        self.swap_at_end = bool(swap_at_end)
        self.posthoc_config = resolve_posthoc(posthoc)
        self.posthoc: PostHocEMA | None = None
        self.evaluator = EMAEvaluator(lambda: self.ema) if eval_ema else None
        stability = StabilityConfig.coerce(stability_metrics)
        self.stability = StabilityMonitor(stability) if stability is not None else None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._saved_step: int | None = None
        #: Steps whose EMA a Hub push already wrote to `checkpoint-N/ema/` and `output_dir/ema/` (see `hub_push.py`).
        self.push_steps = PushSteps()
        self._resume_checkpoint: str | os.PathLike | bool | None = None

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
        if self.trainer is trainer:
            return self
        self._trainer_ref = weakref.ref(trainer)
        wrap_train(trainer, self._record_resume)
        install_checkpoint_push_hook(self, trainer)  # a no-op at each save unless pushing under distributed training
        if self.evaluator is not None:
            self.evaluator.install(trainer)
        handler = trainer.callback_handler
        # Run first among callbacks so the values we add to `logs` reach TensorBoard / W&B in the same entry.
        if self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        return self

    def _record_resume(self, resume_from_checkpoint: Any) -> None:
        # Callbacks never see the folder passed to `trainer.train(resume_from_checkpoint=...)`: record it so the EMA
        # is restored from the same checkpoint as the weights, wherever it lives.
        self._resume_checkpoint = resume_from_checkpoint

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer, _ = find_calling_trainer()
        if trainer is not None:
            self.bind(trainer)
        model = kwargs.get("model")
        if model is not None:
            # Fail on patterns that match nothing now, not after the first steps.
            select_tensors(unwrap_model(model), self.config)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.trainer is None:
            # Added with `trainer.add_callback(...)` after `Trainer(...)`: no `on_init_end` reached us, bind now
            # (the EMA evaluation for this run, and the checkpoint this run resumes from).
            trainer, resume = find_calling_trainer()
            if trainer is not None:
                self.bind(trainer)
                self._resume_checkpoint = resume
        model = kwargs["model"]
        if self.trainer is not None and self.trainer.model is not None:
            # Callbacks get the model as it was before `accelerator.prepare`; under FSDP1 the Trainer then points
            # `trainer.model` at the FSDP root, which owns the shards of the top-level parameters.
            model = self.trainer.model
        self.ema = ModelEMA(model, self.config)
        self.ema.step = state.global_step
        # A new run: nothing of it written by a Hub push yet.
        self.push_steps.reset()
        if self.evaluator is not None:
            self.evaluator.active = True
        if state.global_step > 0:
            self._restore(args, state)
        if self.posthoc_config is not None:
            self.posthoc = PostHocEMA(model, self.posthoc_config, base=self.config)
            self.posthoc.on_train_begin(args, state, self._resume_candidates(args, state))

    # ------------------------------------------------------------------ resume
    def _resume_candidates(self, args: TrainingArguments, state: TrainerState) -> list[Path]:
        out = []
        if self.resume_from is not None:
            out.append(Path(self.resume_from))
        resume = self._resume_checkpoint
        if resume is True:
            resume = get_last_checkpoint(args.output_dir)
        if isinstance(resume, (str, os.PathLike)):
            out.append(Path(resume))
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            out.append(Path(args.resume_from_checkpoint))
        out.append(checkpoint_dir(args.output_dir, state.global_step))
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
                if self.stability is not None:
                    layout = self.ema.layout
                    self.stability.restore(self.ema, folder.parent / STABILITY_DIRNAME, layout.rank, layout.world_size)
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
        if self.posthoc is not None:
            self.posthoc.on_step_end(args, state)
        if self.stability is not None:
            self.stability.step(self.ema)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self.ema is None or logs is None or "loss" not in logs or self.ema.last_decay is None:
            return
        extra = {"ema_decay": float(self.ema.last_decay)}
        if self.stability is not None:
            extra.update(self.stability.metrics(self.ema))
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history before calling us: add our values there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = checkpoint_dir(args.output_dir, state.global_step)
        if not folder.is_dir() and args.should_save:
            logger.warning("Checkpoint folder %s not found; EMA not saved for this step", folder)
            return
        if self.push_steps.pushed != state.global_step:  # a Hub push (before on_save) may have written it already
            self.save(folder / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state)
        if self.stability is not None:  # every rank its own file: the oscillation sample is of its local shards
            self.stability.save(folder / STABILITY_DIRNAME, self.ema.layout.rank, self.ema.layout.world_size)
        if self.posthoc is not None:
            self.posthoc.on_save(args, state, folder)
        if args.push_to_hub:
            after_checkpoint_save(self, args, state)

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer uploads right after this event (for a checkpoint: before `on_save`), so `ema/` is written now.
        prepare_trainer_push(self, args, state, processing_class=kwargs.get("processing_class"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.ema is None:
            return
        if self.posthoc is not None:
            self.posthoc.on_train_end(args, state)
        if self.save_final and self.push_steps.output != state.global_step:  # else a Hub push wrote this step's EMA
            if args.push_to_hub:
                wait_for_pushes(self)  # a checkpoint upload may still be reading output_dir/ema
            self.save(
                Path(args.output_dir) / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state
            )
            self.push_steps.output = state.global_step
        if self.swap_at_end:
            best = state.best_model_checkpoint if args.load_best_model_at_end else None
            make_ema_final(self.ema, args.output_dir, kwargs.get("processing_class"), best_checkpoint=best)
            if self.evaluator is not None:
                # The model now is the EMA: a later `trainer.evaluate()` reports it as `eval_*` only.
                self.evaluator.active = False

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

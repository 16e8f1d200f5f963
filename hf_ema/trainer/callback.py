"""`EMACallback`: a thin `TrainerCallback` that drives a `ModelEMA` and writes `ema/` into every checkpoint."""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..compat.transformers import check_transformers, find_calling_trainer, wrap_train
from ..compat.transformers import output_dir as output_dir_of
from ..config import EMAConfig
from ..ema_folder import load_ema, save_ema
from ..errors import CheckpointError, ConfigMismatchError, StateError
from ..model_ema import ModelEMA
from ..posthoc import PostHocConfig, PostHocEMA, resolve_posthoc
from ..selection import select_tensors, unwrap_model
from ..stability import StabilityConfig, StabilityMonitor
from ..utils.atomic import clean_leftovers, recover_folder
from ..utils.paths import (
    EMA_DIRNAME,
    STABILITY_DIRNAME,
    TRAINER_STATE_NAME,
    checkpoint_dir,
    is_ema_folder,
    list_checkpoints,
)
from ..utils.validation import check_bool, check_path, check_size
from .evaluation import EMAEvaluator, check_best_metric
from .hub_push import HubPushes
from .swap_at_end import check_raw_folder, make_ema_final

__all__ = ["EMACallback"]

logger = logging.getLogger(__name__)


def _has_complete_ema(checkpoint: Path) -> bool:
    folder = checkpoint / EMA_DIRNAME
    recover_folder(folder)  # a replace interrupted between its two renames
    return is_ema_folder(folder)


def _is_complete_checkpoint(checkpoint: Path) -> bool:
    # The Trainer writes `trainer_state.json` last among the files it needs to resume.
    return (checkpoint / TRAINER_STATE_NAME).is_file()


def _complete_checkpoints_text(output_dir: str | os.PathLike, exclude: Path | None = None) -> str:
    complete = [
        c.name
        for c in list_checkpoints(output_dir)
        if _is_complete_checkpoint(c)
        and _has_complete_ema(c)
        and (exclude is None or c.resolve() != exclude.resolve())
    ]
    return "complete: " + ", ".join(complete) if complete else "none is left"


def _remove_leftover_ema_writes(output_dir: str | os.PathLike) -> None:
    # Temporary folders of EMA writes a crash interrupted (ours: `.ema.tmp-*`, `.ema.old-*`), in every checkpoint.
    for checkpoint in [Path(output_dir), *list_checkpoints(output_dir)]:
        clean_leftovers(checkpoint / EMA_DIRNAME)


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
        allow_ema_restart (`bool`, *optional*, defaults to `False`): When training resumes from a checkpoint whose
            `ema/` is missing or incomplete (a crash during the save, a checkpoint written without hf-ema), restart
            the EMA from the resumed weights with a warning instead of stopping with an error. With
            `resume_from_checkpoint=True` the Trainer first falls back to the newest checkpoint whose EMA is complete,
            so the EMA stays exact; this flag only matters when there is none.
        allow_config_change (`bool`, *optional*, defaults to `False`): When training resumes from a checkpoint whose
            EMA was saved with settings that change the average (the schedule, `dtype`, the tensors averaged; see
            [`load_ema`]), go on with this callback's settings from the resume step instead of stopping before
            training with an error naming each changed field. Tensors newly averaged start from the resumed weights
            (with a warning naming them), tensors no longer averaged leave the EMA, a new `dtype` casts the EMA.
        max_shard_size (`int` or `str`, *optional*): Largest weights file of each `ema/` folder, e.g. `"2GB"` or a
            number of bytes; a bigger EMA is split into `model-0000i-of-0000N.safetensors` files with an index, as
            `save_pretrained(max_shard_size=...)` splits a model. Defaults to the model's `save_pretrained` default.
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
        allow_ema_restart: bool = False,
        allow_config_change: bool = False,
        max_shard_size: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        check_transformers()
        config = EMAConfig.resolve(config, kwargs)
        for name, flag in (
            ("save_final", save_final),
            ("eval_ema", eval_ema),
            ("swap_at_end", swap_at_end),
            ("allow_ema_restart", allow_ema_restart),
            ("allow_config_change", allow_config_change),
        ):
            check_bool(name, flag)
        check_path("resume_from", resume_from, optional=True)
        self.max_shard_size = check_size("max_shard_size", max_shard_size, optional=True)
        self.config = config
        self.resume_from = resume_from
        self.allow_ema_restart = allow_ema_restart
        self.allow_config_change = allow_config_change
        self.save_final = save_final
        self.ema: ModelEMA | None = None
        self.swap_at_end = swap_at_end
        self.posthoc_config = resolve_posthoc(posthoc)
        self.posthoc: PostHocEMA | None = None
        self.evaluator = EMAEvaluator(lambda: self.ema) if eval_ema else None
        stability = StabilityConfig.coerce(stability_metrics)
        self.stability = StabilityMonitor(stability) if stability is not None else None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._saved_step: int | None = None
        #: The Trainer's Hub pushes, and the steps whose EMA a push already wrote to `checkpoint-N/ema/` and
        #: `output_dir/ema/` (see `hub_push.py`).
        self.hub = HubPushes(self)
        self._resume_checkpoint: str | os.PathLike | bool | None = None

    # ------------------------------------------------------------------ wiring
    def _require_ema(self) -> ModelEMA:
        if self.ema is None:
            raise StateError("the EMA does not exist yet: `EMACallback` builds it when training begins")
        return self.ema

    @property
    def trainer(self) -> Trainer | None:
        """The Trainer this callback was attached to, when it could be found."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    def bind(self, trainer: Trainer) -> EMACallback:
        """Attach the callback to `trainer`: the explicit, documented way.

        ```python
        callback = EMACallback(decay=0.999)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
        callback.bind(trainer)
        ```

        The EMA needs the trainer itself (Trainer callbacks are only handed the model, the arguments and the
        state): to learn which checkpoint `trainer.train(resume_from_checkpoint=...)` resumes from, to evaluate the
        EMA in the same log entry as the raw weights, and to write the EMA before a Hub upload. Without `bind`, the
        callback falls back to finding the `Trainer` that calls it on the call stack
        (`hf_ema.compat.transformers.find_calling_trainer`, at `on_init_end`, or at `on_train_begin` for a callback
        added with `trainer.add_callback`). Idempotent.

        Args:
            trainer (`Trainer`): The trainer.

        Returns:
            `EMACallback`: the callback itself.

        Raises:
            `ConfigError`: when `metric_for_best_model` is an EMA metric (`eval_ema_loss`) and the callback was built
                with `eval_ema=False`.
        """
        if self.trainer is trainer:
            return self
        check_best_metric(trainer.args.metric_for_best_model, eval_ema=self.evaluator is not None)
        self._trainer_ref = weakref.ref(trainer)
        wrap_train(trainer, self._record_resume)
        self.hub.install(trainer)  # a no-op at each save unless pushing under distributed training
        if self.evaluator is not None:
            self.evaluator.install(trainer)
        handler = trainer.callback_handler
        # Run first among callbacks so the values we add to `logs` reach TensorBoard / W&B in the same entry.
        if self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        return self

    def _record_resume(self, resume_from_checkpoint: Any) -> Any:
        # Called by `trainer.train(...)` before the Trainer loads anything. Callbacks never see the folder passed as
        # `resume_from_checkpoint`: record it so the EMA is restored from the same checkpoint as the weights, and
        # make sure that checkpoint has a complete EMA (see `_checked_resume`).
        trainer = self.trainer
        if trainer is not None and resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = self._checked_resume(resume_from_checkpoint, output_dir_of(trainer.args))
        self._resume_checkpoint = resume_from_checkpoint
        return resume_from_checkpoint

    def _checked_resume(self, resume: Any, output_dir: str) -> Any:
        """The checkpoint to resume from, such that its EMA is the one an uninterrupted run has at that step.

        A crash after the Trainer wrote `checkpoint-N/` but before `checkpoint-N/ema/` was complete leaves a
        resumable Trainer checkpoint without an EMA. With `resume_from_checkpoint=True`, resume from the newest
        checkpoint whose trainer state and `ema/` are both complete instead (the newest complete pair wins: the steps
        after it are trained again, deterministically); with an explicit path to such a checkpoint, or with no
        complete pair left, stop before training with an error that names the ways on.
        """
        if self.resume_from is not None:
            return resume  # the user named the EMA's source explicitly
        if resume is True:
            last = get_last_checkpoint(output_dir)
            if last is None:
                return resume  # the Trainer raises its own error
            target = Path(last)
        else:
            target = Path(resume)
        if not target.is_dir() or _has_complete_ema(target):
            return resume
        if resume is True:
            for candidate in reversed(list_checkpoints(output_dir)):
                if _is_complete_checkpoint(candidate) and _has_complete_ema(candidate):
                    logger.warning(
                        "%s has no complete EMA (a save was interrupted): resuming from %s, the newest checkpoint "
                        "whose weights and EMA are both complete",
                        target,
                        candidate,
                    )
                    return str(candidate)
        if self.allow_ema_restart:
            return resume  # `_restore` finds no EMA there and says once that it restarts
        raise CheckpointError(
            f"cannot resume the EMA: {target} has no complete `{EMA_DIRNAME}/` (the save was interrupted, or the "
            f"checkpoint was written without hf-ema). Resume from a checkpoint whose `{EMA_DIRNAME}/` is complete "
            f"({_complete_checkpoints_text(output_dir)}), or pass `EMACallback(allow_ema_restart=True)` to restart "
            f"the EMA from the resumed weights"
        )

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
        if self.swap_at_end:
            check_raw_folder(output_dir_of(args))  # a foreign `raw/` is refused before any step, not after training
        if self.trainer is not None and self.trainer.model is not None:
            # Callbacks get the model as it was before `accelerator.prepare`; under FSDP1 the Trainer then points
            # `trainer.model` at the FSDP root, which owns the shards of the top-level parameters.
            model = self.trainer.model
        self.ema = ModelEMA(model, self.config)
        self.ema.step = state.global_step
        # A new run: nothing of it written by a Hub push yet.
        self.hub.reset()
        if self.evaluator is not None:
            self.evaluator.active = True
        if state.global_step > 0:
            self._restore(args, state)
        if self.posthoc_config is not None:
            self.posthoc = PostHocEMA(model, self.posthoc_config, base=self.config)
            self.posthoc.on_train_begin(
                args, state, self._resume_candidates(args, state), allow_config_change=self.allow_config_change
            )

    # ------------------------------------------------------------------ resume
    def _resume_candidates(self, args: TrainingArguments, state: TrainerState) -> list[Path]:
        out = []
        if self.resume_from is not None:
            out.append(Path(self.resume_from))
        resume = self._resume_checkpoint
        if resume is True:
            resume = get_last_checkpoint(output_dir_of(args))
        if isinstance(resume, (str, os.PathLike)):
            out.append(Path(resume))
        from_args = getattr(args, "resume_from_checkpoint", None)
        if isinstance(from_args, str):
            out.append(Path(from_args))
        out.append(checkpoint_dir(output_dir_of(args), state.global_step))
        unique: list[Path] = []
        for path in out:
            if path not in unique:
                unique.append(path)
        return unique

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = self._resume_candidates(args, state)
        for candidate in candidates:
            folder = candidate if is_ema_folder(candidate) else candidate / EMA_DIRNAME
            recover_folder(folder)  # a replace interrupted between its two renames
            if is_ema_folder(folder):
                meta = self._load(folder, output_dir_of(args))
                if meta["step"] != state.global_step:
                    logger.warning(
                        "EMA restored from %s is at step %s but training resumes at step %s",
                        folder,
                        meta["step"],
                        state.global_step,
                    )
                logger.info("EMA restored from %s (step %s)", folder, meta["step"])
                if self.stability is not None:
                    layout = self._require_ema().layout
                    self.stability.restore(self.ema, folder.parent / STABILITY_DIRNAME, layout.rank, layout.world_size)
                return
        where = ", ".join(str(c) for c in candidates)
        if self.allow_ema_restart:
            logger.warning(
                "resuming at step %s with no complete `%s/` in %s: the EMA restarts from the resumed weights "
                "(allow_ema_restart=True)",
                state.global_step,
                EMA_DIRNAME,
                where,
            )
            return
        raise CheckpointError(
            f"cannot resume the EMA at step {state.global_step}: no complete `{EMA_DIRNAME}/` in {where}. Resume "
            f"from a checkpoint whose `{EMA_DIRNAME}/` is complete ({_complete_checkpoints_text(output_dir_of(args))}), "
            f"or pass `EMACallback(allow_ema_restart=True)` to restart the EMA from the current weights"
        )

    def _load(self, folder: Path, output_dir: str) -> dict[str, Any]:
        """`load_ema` of the resume; a damaged folder's error names the checkpoints to resume from instead."""
        try:
            return load_ema(self._require_ema(), folder, allow_config_change=self.allow_config_change)
        except ConfigMismatchError:
            raise  # it names its own way on
        except CheckpointError as err:
            others = _complete_checkpoints_text(output_dir, exclude=folder.parent)
            raise CheckpointError(
                f"cannot resume the EMA: {err}. Resume from another checkpoint whose `{EMA_DIRNAME}/` is complete "
                f"({others}), or pass `EMACallback(allow_ema_restart=True)` to restart the EMA from the current "
                f"weights"
            ) from None

    # ------------------------------------------------------------------ training events
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # on_step_end fires once per optimizer step, after gradient accumulation, with global_step incremented.
        self._require_ema().update(step=state.global_step)
        if self.posthoc is not None:
            self.posthoc.on_step_end(args, state)
        if self.stability is not None:
            self.stability.step(self.ema)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if self.ema is None or logs is None or "loss" not in logs:
            return
        extra: dict[str, Any] = {}
        if self.ema.last_decay is not None:
            extra["ema_decay"] = float(self.ema.last_decay)
            if self.stability is not None:
                extra.update(self.stability.metrics(self.ema))
        if self.config.on_nonfinite != "ignore":
            # Updates skipped because the weights held NaN/inf (an update in the background counts once it is done).
            extra["ema_skipped_updates"] = self.ema.num_skipped
        if self.ema.coalesces and self.ema.last_interval is not None:
            # Steps the last update covered: more than `update_every` when updates were coalesced while the
            # background fold of the offloaded EMA was busy.
            extra["ema_update_interval"] = self.ema.last_interval
        if not extra:
            return
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history before calling us: add our values there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = checkpoint_dir(output_dir_of(args), state.global_step)
        if not folder.is_dir() and args.should_save:
            logger.warning("Checkpoint folder %s not found; EMA not saved for this step", folder)
            return
        # `ema/` goes last: its atomic rename commits everything hf-ema adds to the checkpoint, so a checkpoint with a
        # complete `ema/` also has the stability and post-hoc states (what `_checked_resume` relies on).
        if self.stability is not None:  # every rank its own file: the oscillation sample is of its local shards
            layout = self._require_ema().layout
            self.stability.save(folder / STABILITY_DIRNAME, layout.rank, layout.world_size)
        if self.posthoc is not None:
            self.posthoc.on_save(args, state, folder)
        if self.hub.pushed != state.global_step:  # a Hub push (before on_save) may have written it already
            self.save(folder / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state)
        if self._require_ema().layout.is_main_process():
            _remove_leftover_ema_writes(output_dir_of(args))
        if args.push_to_hub:
            self.hub.after_checkpoint_save(args, state)

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # The Trainer uploads right after this event (for a checkpoint: before `on_save`), so `ema/` is written now.
        self.hub.prepare(args, state, processing_class=kwargs.get("processing_class"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.ema is None:
            return
        if self.posthoc is not None:
            self.posthoc.on_train_end(args, state)
        if self.save_final and self.hub.output != state.global_step:  # else a Hub push wrote this step's EMA
            if args.push_to_hub:
                self.hub.wait()  # a checkpoint upload may still be reading output_dir/ema
            self.save(
                Path(output_dir_of(args)) / EMA_DIRNAME, processing_class=kwargs.get("processing_class"), state=state
            )
            self.hub.output = state.global_step
        if self.swap_at_end:
            best = state.best_model_checkpoint if args.load_best_model_at_end else None
            make_ema_final(self.ema, output_dir_of(args), kwargs.get("processing_class"), best_checkpoint=best)
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
        return save_ema(
            self._require_ema(),
            folder,
            processing_class=processing_class,
            extra_state=extra,
            max_shard_size=self.max_shard_size,
        )

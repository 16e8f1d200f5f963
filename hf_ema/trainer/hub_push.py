"""The `Trainer(push_to_hub=True)` glue: every push the Trainer makes carries the EMA of the step it pushes.

`Trainer` pushes a checkpoint from inside `_save_checkpoint`, calling `on_push_begin` right before the upload and
`on_save` only after it, so [`EMACallback`] writes `checkpoint-N/ema/` and `output_dir/ema/` at `on_push_begin`
([`prepare_trainer_push`]) and `on_save` then skips the write it would otherwise make. Under distributed training
`on_push_begin` reaches the main process only, too late for a collective write of a sharded EMA, so
[`install_checkpoint_push_hook`] writes `checkpoint-N/ema/` on every process just before the Trainer's checkpoint
push starts, and `on_push_begin` then only copies it to `output_dir/ema/`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compat.transformers import finish_current_push, wrap_push_from_checkpoint
from ..compat.transformers import output_dir as output_dir_of
from ..tools.model_card import write_model_card
from ..utils.atomic import atomic_folder
from ..utils.paths import EMA_DIRNAME, checkpoint_dir

if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments

    from .callback import EMACallback

__all__ = [
    "PushSteps",
    "after_checkpoint_save",
    "install_checkpoint_push_hook",
    "prepare_trainer_push",
    "wait_for_pushes",
]

logger = logging.getLogger(__name__)


@dataclass
class PushSteps:
    """Which steps' EMA a Hub push already wrote, so the callback does not write it again.

    Args:
        pushed (`int`, *optional*): The step whose `checkpoint-N/ema/` a push wrote.
        output (`int`, *optional*): The step whose EMA is in `output_dir/ema/`.
        copied (`int`, *optional*): Main process: the step whose EMA a push copied to `output_dir/ema/`.
        warned_distributed (`bool`, defaults to `False`): The stale-EMA warning was logged.
    """

    pushed: int | None = None
    output: int | None = None
    copied: int | None = None
    warned_distributed: bool = False

    def reset(self) -> None:
        """A new run: nothing of it written by a push yet."""
        self.pushed = self.output = self.copied = None


def wait_for_pushes(callback: EMACallback) -> None:
    """Wait for the Trainer's background checkpoint uploads, which may be reading `output_dir/ema/`.

    Args:
        callback (`EMACallback`): The callback, bound to its trainer.
    """
    finish_current_push(callback.trainer)


def _copy_folder(src: Path, dst: Path) -> None:
    with atomic_folder(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _repo_id(callback: EMACallback, args: TrainingArguments) -> str | None:
    return getattr(callback.trainer, "hub_model_id", None) or args.hub_model_id


def prepare_trainer_push(
    callback: EMACallback, args: TrainingArguments, state: TrainerState, processing_class: Any | None = None
) -> None:
    """Write the EMA where the Trainer is about to upload from (`EMACallback.on_push_begin`).

    During training (`Trainer._push_from_checkpoint`, main process only, before `on_save`): write
    `checkpoint-N/ema/`, copy it to `output_dir/ema/` and write their model cards, so both the `output_dir` push and
    a `last-checkpoint/` push carry this step's EMA. Under distributed training this event reaches only the main
    process, where no collective gather is possible: every process has already written `checkpoint-N/ema/` (see
    [`install_checkpoint_push_hook`]), and this only copies it to `output_dir/ema/`. After training
    (`Trainer.push_to_hub`, every process): make sure `output_dir/ema/` holds the final EMA and its card.

    Args:
        callback (`EMACallback`): The callback.
        args (`TrainingArguments`): The training arguments.
        state (`TrainerState`): The trainer state.
        processing_class (*optional*): Tokenizer / processor saved with the EMA.
    """
    ema = callback.ema
    if ema is None:
        return
    output_ema = Path(output_dir_of(args)) / EMA_DIRNAME
    repo_id = _repo_id(callback, args)
    in_train = bool(getattr(callback.trainer, "is_in_train", False))
    if in_train:
        folder = checkpoint_dir(output_dir_of(args), state.global_step) / EMA_DIRNAME
        distributed = ema.layout.world_size > 1
        if distributed and callback.push_steps.pushed != state.global_step:
            # Only when the hook could not be installed (a Trainer without `_push_from_checkpoint`).
            if not callback.push_steps.warned_distributed:
                logger.warning(
                    "Checkpoint pushes under distributed training carry the EMA of the previous checkpoint "
                    "(the Trainer calls on_push_begin on the main process only); the final push is up to date."
                )
                callback.push_steps.warned_distributed = True
            return
        if not folder.parent.is_dir():
            logger.warning("Checkpoint folder %s not found; the push carries no EMA for this step", folder.parent)
            return
        if not distributed:
            callback.save(folder, processing_class=processing_class, state=state)
            callback.push_steps.pushed = state.global_step
        write_model_card(folder, repo_id=repo_id, log_history=state.log_history)
        wait_for_pushes(callback)
        _copy_folder(folder, output_ema)
        # Main process only under distributed training: `after_checkpoint_save` records the step on every process.
        callback.push_steps.copied = state.global_step
        if not distributed:
            callback.push_steps.output = state.global_step
        return
    if callback.push_steps.output != state.global_step:
        wait_for_pushes(callback)
        callback.save(output_ema, processing_class=processing_class, state=state)
        callback.push_steps.output = state.global_step
    if ema.layout.is_main_process():
        write_model_card(output_ema, repo_id=repo_id, log_history=state.log_history)


def save_before_checkpoint_push(callback: EMACallback, checkpoint_folder: str | os.PathLike) -> None:
    """Write `checkpoint-N/ema/` on every process, right before the Trainer pushes `checkpoint-N` (distributed
    training only: a single process writes it at `on_push_begin`).

    Args:
        callback (`EMACallback`): The callback, bound to its trainer.
        checkpoint_folder (`str` or `os.PathLike`): The checkpoint folder the Trainer is about to push.
    """
    ema, trainer = callback.ema, callback.trainer
    if ema is None or trainer is None or ema.layout.world_size == 1 or not trainer.args.push_to_hub:
        return
    if trainer.args.hub_strategy == "end":
        return  # the Trainer pushes no checkpoint; `on_save` writes `ema/` as usual
    state = trainer.state
    # A collective call: every process reaches it, since every process runs `_save_checkpoint`.
    callback.save(Path(checkpoint_folder) / EMA_DIRNAME, processing_class=trainer.processing_class, state=state)
    callback.push_steps.pushed = state.global_step


def install_checkpoint_push_hook(callback: EMACallback, trainer: Any) -> None:
    """Make `trainer` write the EMA of a checkpoint on every process before it pushes that checkpoint.

    `Trainer._save_checkpoint` runs on every process and calls `_push_from_checkpoint` (which returns at once
    except on the main process) before `on_save`; the `on_push_begin` event inside it reaches the main process only.
    Wrapping `_push_from_checkpoint` is the one place where all processes can take part in gathering a sharded EMA
    before the upload starts. Without that method (another Trainer version) nothing is wrapped, and distributed
    checkpoint pushes carry the previous checkpoint's EMA, with a warning.

    Args:
        callback (`EMACallback`): The callback.
        trainer (`Trainer`): The trainer to wrap.
    """

    def before_push(checkpoint_folder: str | os.PathLike) -> None:
        save_before_checkpoint_push(callback, checkpoint_folder)

    wrap_push_from_checkpoint(trainer, before_push)


def after_checkpoint_save(callback: EMACallback, args: TrainingArguments, state: TrainerState) -> None:
    """After `on_save` under distributed training with Hub pushes: copy `checkpoint-N/ema/` to `output_dir/ema/`
    so that the next checkpoint push carries it (no-op in a single process, where the push wrote it already).

    Args:
        callback (`EMACallback`): The callback.
        args (`TrainingArguments`): The training arguments.
        state (`TrainerState`): The trainer state.
    """
    ema = callback.ema
    if ema is None or not args.push_to_hub or ema.layout.world_size == 1 or args.hub_strategy == "end":
        return
    folder = checkpoint_dir(output_dir_of(args), state.global_step) / EMA_DIRNAME
    already_copied = callback.push_steps.copied == state.global_step  # by the push of this very checkpoint
    if ema.layout.is_main_process() and folder.is_dir() and not already_copied:
        wait_for_pushes(callback)
        _copy_folder(folder, Path(output_dir_of(args)) / EMA_DIRNAME)
        write_model_card(
            Path(output_dir_of(args)) / EMA_DIRNAME, repo_id=_repo_id(callback, args), log_history=state.log_history
        )
    # Every process records it, so that they all take the same branch in the collective final save.
    callback.push_steps.output = state.global_step

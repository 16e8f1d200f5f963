"""The `Trainer(push_to_hub=True)` glue: every push the Trainer makes carries the EMA of the step it pushes.

`Trainer` pushes a checkpoint from inside `_save_checkpoint`, calling `on_push_begin` right before the upload and
`on_save` only after it, so [`EMACallback`] writes `checkpoint-N/ema/` and `output_dir/ema/` at `on_push_begin`
([`HubPushes.prepare`]) and `on_save` then skips the write it would otherwise make. Under distributed training
`on_push_begin` reaches the main process only, too late for a collective write of a sharded EMA, so
[`HubPushes.install`] writes `checkpoint-N/ema/` on every process just before the Trainer's checkpoint
push starts, and `on_push_begin` then only copies it to `output_dir/ema/`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..compat.transformers import finish_current_push, wrap_push_from_checkpoint
from ..compat.transformers import output_dir as output_dir_of
from ..tools.model_card import write_model_card
from ..utils.atomic import atomic_folder
from ..utils.paths import EMA_DIRNAME, checkpoint_dir

if TYPE_CHECKING:
    from transformers import Trainer, TrainerState, TrainingArguments

    from ..model_ema import ModelEMA

__all__ = ["HubPushes"]

logger = logging.getLogger(__name__)


class _Owner(Protocol):
    """What the pushes read of the callback that owns them."""

    @property
    def ema(self) -> ModelEMA | None: ...

    @property
    def trainer(self) -> Trainer | None: ...

    def save(
        self, folder: str | os.PathLike, processing_class: Any | None = None, state: Any | None = None
    ) -> Any: ...


def _copy_folder(src: Path, dst: Path) -> None:
    with atomic_folder(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


class HubPushes:
    """The Trainer's Hub pushes of one [`EMACallback`], which owns it: every push carries the EMA of the step it
    pushes, and the steps whose EMA a push already wrote are not written again.

    Args:
        owner (`EMACallback`): The callback (its `ema`, `trainer` and `save`).

    Attributes:
        pushed (`int`, *optional*): The step whose `checkpoint-N/ema/` a push wrote.
        output (`int`, *optional*): The step whose EMA is in `output_dir/ema/`.
        copied (`int`, *optional*): Main process: the step whose EMA a push copied to `output_dir/ema/`.
        warned_distributed (`bool`): The stale-EMA warning was logged.
    """

    def __init__(self, owner: _Owner) -> None:
        self.owner = owner
        self.pushed: int | None = None
        self.output: int | None = None
        self.copied: int | None = None
        self.warned_distributed = False

    def reset(self) -> None:
        """A new run: nothing of it written by a push yet."""
        self.pushed = self.output = self.copied = None

    def wait(self) -> None:
        """Wait for the Trainer's background checkpoint uploads, which may be reading `output_dir/ema/`."""
        finish_current_push(self.owner.trainer)

    def _repo_id(self, args: TrainingArguments) -> str | None:
        return getattr(self.owner.trainer, "hub_model_id", None) or args.hub_model_id

    # ------------------------------------------------------------------ events
    def prepare(self, args: TrainingArguments, state: TrainerState, processing_class: Any | None = None) -> None:
        """Write the EMA where the Trainer is about to upload from (`EMACallback.on_push_begin`).

        During training (`Trainer._push_from_checkpoint`, main process only, before `on_save`): write
        `checkpoint-N/ema/`, copy it to `output_dir/ema/` and write their model cards, so both the `output_dir` push
        and a `last-checkpoint/` push carry this step's EMA (see `_prepare_checkpoint_push`). After training
        (`Trainer.push_to_hub`, every process): make sure `output_dir/ema/` holds the final EMA and its card.

        Args:
            args (`TrainingArguments`): The training arguments.
            state (`TrainerState`): The trainer state.
            processing_class (*optional*): Tokenizer / processor saved with the EMA.
        """
        ema = self.owner.ema
        if ema is None:
            return
        if bool(getattr(self.owner.trainer, "is_in_train", False)):
            self._prepare_checkpoint_push(args, state, processing_class)
            return
        output_ema = Path(output_dir_of(args)) / EMA_DIRNAME
        if self.output != state.global_step:
            self.wait()
            self.owner.save(output_ema, processing_class=processing_class, state=state)
            self.output = state.global_step
        if ema.layout.is_main_process():
            write_model_card(output_ema, repo_id=self._repo_id(args), log_history=state.log_history)

    def _prepare_checkpoint_push(self, args: TrainingArguments, state: TrainerState, processing_class: Any) -> None:
        # Under distributed training this event reaches only the main process, where no collective write is
        # possible: every process has already written `checkpoint-N/ema/` (see `install`), and this only copies it
        # to `output_dir/ema/`.
        ema = self.owner.ema
        assert ema is not None  # checked by `prepare`
        folder = checkpoint_dir(output_dir_of(args), state.global_step) / EMA_DIRNAME
        distributed = ema.layout.world_size > 1
        if distributed and self.pushed != state.global_step:
            # Only when the hook could not be installed (a Trainer without `_push_from_checkpoint`).
            if not self.warned_distributed:
                logger.warning(
                    "Checkpoint pushes under distributed training carry the EMA of the previous checkpoint "
                    "(the Trainer calls on_push_begin on the main process only); the final push is up to date."
                )
                self.warned_distributed = True
            return
        if not folder.parent.is_dir():
            logger.warning("Checkpoint folder %s not found; the push carries no EMA for this step", folder.parent)
            return
        if not distributed:
            self.owner.save(folder, processing_class=processing_class, state=state)
            self.pushed = state.global_step
        write_model_card(folder, repo_id=self._repo_id(args), log_history=state.log_history)
        self.wait()
        _copy_folder(folder, Path(output_dir_of(args)) / EMA_DIRNAME)
        # Main process only under distributed training: `after_checkpoint_save` records the step on every process.
        self.copied = state.global_step
        if not distributed:
            self.output = state.global_step

    def before_checkpoint_push(self, checkpoint_folder: str | os.PathLike) -> None:
        """Write `checkpoint-N/ema/` on every process, right before the Trainer pushes `checkpoint-N` (distributed
        training only: a single process writes it at `on_push_begin`).

        Args:
            checkpoint_folder (`str` or `os.PathLike`): The checkpoint folder the Trainer is about to push.
        """
        ema, trainer = self.owner.ema, self.owner.trainer
        if ema is None or trainer is None or ema.layout.world_size == 1 or not trainer.args.push_to_hub:
            return
        if trainer.args.hub_strategy == "end":
            return  # the Trainer pushes no checkpoint; `on_save` writes `ema/` as usual
        state = trainer.state
        # A collective call: every process reaches it, since every process runs `_save_checkpoint`.
        self.owner.save(Path(checkpoint_folder) / EMA_DIRNAME, processing_class=trainer.processing_class, state=state)
        self.pushed = state.global_step

    def install(self, trainer: Any) -> None:
        """Make `trainer` write the EMA of a checkpoint on every process before it pushes that checkpoint.

        `Trainer._save_checkpoint` runs on every process and calls `_push_from_checkpoint` (which returns at once
        except on the main process) before `on_save`; the `on_push_begin` event inside it reaches the main process
        only. Wrapping `_push_from_checkpoint` is the one place where all processes can take part in writing a
        sharded EMA before the upload starts. Without that method (another Trainer version) nothing is wrapped, and
        distributed checkpoint pushes carry the previous checkpoint's EMA, with a warning.

        Args:
            trainer (`Trainer`): The trainer to wrap.
        """
        wrap_push_from_checkpoint(trainer, self.before_checkpoint_push)

    def after_checkpoint_save(self, args: TrainingArguments, state: TrainerState) -> None:
        """After `on_save` under distributed training with Hub pushes: copy `checkpoint-N/ema/` to `output_dir/ema/`
        so that the next checkpoint push carries it (no-op in a single process, where the push wrote it already).

        Args:
            args (`TrainingArguments`): The training arguments.
            state (`TrainerState`): The trainer state.
        """
        ema = self.owner.ema
        if ema is None or not args.push_to_hub or ema.layout.world_size == 1 or args.hub_strategy == "end":
            return
        folder = checkpoint_dir(output_dir_of(args), state.global_step) / EMA_DIRNAME
        already_copied = self.copied == state.global_step  # by the push of this very checkpoint
        if ema.layout.is_main_process() and folder.is_dir() and not already_copied:
            output_ema = Path(output_dir_of(args)) / EMA_DIRNAME
            self.wait()
            _copy_folder(folder, output_ema)
            write_model_card(output_ema, repo_id=self._repo_id(args), log_history=state.log_history)
        # Every process records it, so that they all take the same branch in the collective final save.
        self.output = state.global_step

"""The private `transformers.Trainer` APIs hf-ema relies on, each in one place behind a version guard.

- `Trainer._push_from_checkpoint`: wrapped so every process writes a sharded EMA before a checkpoint upload.
- `Trainer._finish_current_push`: the Trainer's own wait for background uploads.
- `Trainer.train` / `Trainer.evaluation_loop`: wrapped on the instance (the class is untouched) to learn the folder
  a run resumes from and to evaluate the EMA in the same log entry.
- A stack walk that finds the `Trainer` calling a callback, only when the callback was not bound explicitly with
  `EMACallback.bind(trainer)`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

from ._guard import missing_api, require_version

__all__ = [
    "MIN_TRANSFORMERS",
    "check_transformers",
    "find_calling_trainer",
    "finish_current_push",
    "output_dir",
    "wrap_push_from_checkpoint",
    "wrap_train",
]

#: The oldest transformers hf-ema is tested with (the minimum-versions CI job): `TrainerCallback.on_push_begin`
#: and `Trainer.processing_class` are needed.
MIN_TRANSFORMERS = "4.46"

_WRAPPED = "_hf_ema_wrapped"


def check_transformers() -> None:
    """Raise `UpstreamChangedError` when transformers is older than hf-ema supports or lacks `on_push_begin`."""
    require_version("transformers", MIN_TRANSFORMERS, "hf-ema's Trainer integration")
    from transformers import TrainerCallback

    if not hasattr(TrainerCallback, "on_push_begin"):
        raise missing_api("transformers", "TrainerCallback.on_push_begin", "EMACallback")


def find_calling_trainer(depth: int = 12) -> tuple[Any | None, Any]:
    """The `Trainer` whose method is calling us (callbacks are not handed the trainer itself), and the value of
    `resume_from_checkpoint` in that method (`_inner_training_loop` has it; `__init__` does not).

    Args:
        depth (`int`, *optional*, defaults to 12): How many frames to look through.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            if frame is None:
                return None, None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate, frame.f_locals.get("resume_from_checkpoint")
            frame = frame.f_back
    finally:
        del frame
    return None, None


def wrap_train(trainer: Any, on_call: Callable[[Any], Any]) -> None:
    """Call `on_call(resume_from_checkpoint)` at each `trainer.train(...)` call, before training starts, and train
    with the checkpoint it returns (it may pick another checkpoint, or raise to stop before anything is loaded).

    Callbacks never see the folder passed to `trainer.train(resume_from_checkpoint=...)`; the instance's `train` is
    wrapped (the class is untouched). Idempotent per trainer: a later call replaces the observer.

    Args:
        trainer (`Trainer`): The trainer.
        on_call (`Callable`): Receives the `resume_from_checkpoint` argument (`None`, `True` or a path) and returns
            the value to train with.
    """
    current = trainer.__dict__.get("train")
    original: Callable[..., Any] = (
        getattr(current, "__wrapped__", trainer.train) if getattr(current, _WRAPPED, False) else trainer.train
    )
    observer = weakref.WeakMethod(on_call) if inspect.ismethod(on_call) else (lambda: on_call)

    @functools.wraps(original)
    def train(*args: Any, **kwargs: Any):
        callback = observer()
        if callback is not None:
            resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
            chosen = callback(resume)
            if chosen is not resume:
                if args:
                    args = (chosen, *args[1:])
                else:
                    kwargs["resume_from_checkpoint"] = chosen
        return original(*args, **kwargs)

    setattr(train, _WRAPPED, True)
    trainer.train = train


def wrap_push_from_checkpoint(trainer: Any, before_push: Callable[[Any], None]) -> bool:
    """Call `before_push(checkpoint_folder)` on every process right before the Trainer pushes a checkpoint.

    `Trainer._save_checkpoint` runs on every process and calls `_push_from_checkpoint` (which returns at once except
    on the main process) before `on_save`; the `on_push_begin` event inside it reaches the main process only.

    Args:
        trainer (`Trainer`): The trainer.
        before_push (`Callable`): Receives the checkpoint folder.

    Returns:
        `bool`: whether the hook is installed (`False` on a Trainer without `_push_from_checkpoint`).
    """
    original = getattr(trainer, "_push_from_checkpoint", None)
    if not callable(original):
        return False
    if getattr(original, _WRAPPED, False):
        return True
    callback = weakref.WeakMethod(before_push) if inspect.ismethod(before_push) else (lambda: before_push)

    @functools.wraps(original)
    def push_from_checkpoint(checkpoint_folder, *args: Any, **kwargs: Any):
        hook = callback()
        if hook is not None:
            hook(checkpoint_folder)
        return original(checkpoint_folder, *args, **kwargs)

    setattr(push_from_checkpoint, _WRAPPED, True)
    trainer._push_from_checkpoint = push_from_checkpoint
    return True


def finish_current_push(trainer: Any) -> None:
    """Wait for the Trainer's background checkpoint uploads (its own `_finish_current_push`; no public equivalent).

    Args:
        trainer (`Trainer` or `None`): The trainer.
    """
    finish = getattr(trainer, "_finish_current_push", None)
    if callable(finish):
        finish()


def output_dir(args: Any) -> str:
    """`TrainingArguments.output_dir`. transformers 5 types it `str | None` and fills in a default at construction,
    so it is never `None` once a Trainer exists; this says so once instead of at every use.

    Args:
        args (`TrainingArguments`): The training arguments.
    """
    folder = args.output_dir
    if folder is None:
        raise missing_api("transformers", "TrainingArguments.output_dir", "EMACallback")
    return str(folder)

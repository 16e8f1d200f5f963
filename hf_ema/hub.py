"""Pushing an EMA to the Hugging Face Hub: `push_ema` (behind `hf-ema push`) and the `Trainer(push_to_hub=True)` hooks.

`Trainer` pushes a checkpoint from inside `_save_checkpoint`, calling `on_push_begin` right before the upload and
`on_save` only after it, so [`EMACallback`] writes `checkpoint-N/ema/` and `output_dir/ema/` at `on_push_begin`
([`prepare_trainer_push`]) and `on_save` then skips the write it would otherwise make. Under distributed training
`on_push_begin` reaches the main process only, too late for the collective gather of a sharded EMA, so
[`install_checkpoint_push_hook`] writes `checkpoint-N/ema/` on every process just before the Trainer's checkpoint
push starts, and `on_push_begin` then only copies it to `output_dir/ema/`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ConfigTypeError
from .model_card import CARD_NAME, ema_card_text, locate_ema_folder, read_eval_metrics, write_model_card
from .serialization import EMA_DIRNAME, atomic_folder, read_ema_state

if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments

    from .callback import EMACallback

__all__ = [
    "after_checkpoint_save",
    "install_checkpoint_push_hook",
    "prepare_trainer_push",
    "push_ema",
    "wait_for_pushes",
    "write_model_card",
]

logger = logging.getLogger(__name__)


def _check_str(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigTypeError(f"`{name}` must be a non-empty string, got {value!r}")


def _files_to_upload(ema_dir: Path) -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ema_dir.rglob("*")):
        rel = path.relative_to(ema_dir).as_posix()
        # Skip atomic_folder leftovers (".name.tmp-*") and the local card, which is regenerated for the repo.
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == CARD_NAME:
            continue
        out.append((rel, path))
    return out


def _remote_text(api: Any, repo_id: str, filename: str, revision: str | None) -> str | None:
    """A small text file of the repo, or `None` when it has none (a fresh repo or branch)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=api.endpoint)
    response = get_session().get(url, headers=build_hf_headers(token=api.token), follow_redirects=True)
    if response.status_code == 404:
        return None
    hf_raise_for_status(response)
    return response.text


def push_ema(
    path: str | os.PathLike,
    repo_id: str,
    subfolder: str | None = EMA_DIRNAME,
    as_main: bool = False,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an EMA to a Hub repository, with a model card saying it is an EMA, in one commit.

    The repository is created when missing. The EMA folder goes to `subfolder/` (load it with
    `from_pretrained(repo_id, subfolder="ema")`) with its own `README.md`, and the repository's `README.md` gets an
    EMA section (added to the existing card, or replacing the EMA section of an earlier push). With `as_main=True`
    the EMA files go to the repository root and become its main weights. The card gives the EMA's decay and step
    and the raw vs EMA evaluation metrics when they were recorded (see [`read_eval_metrics`]). Local files are not
    modified.

    Args:
        path (`str` or `os.PathLike`): An `ema/` folder, a checkpoint folder or a run folder holding `ema/`.
        repo_id (`str`): The repository, e.g. `"user/my-model"`.
        subfolder (`str`, *optional*, defaults to `"ema"`): Folder of the repository to upload into; `None` means
            the root (same as `as_main=True`).
        as_main (`bool`, *optional*, defaults to `False`): Make the EMA the repository's main weights.
        private (`bool`, *optional*, defaults to `False`): Create the repository as private (no effect if it exists).
        revision (`str`, *optional*): Branch to commit to (created from the default branch when missing).
        token (`str`, *optional*): Hub token; defaults to the `HF_TOKEN` variable or the saved login.
        commit_message (`str`, *optional*): Defaults to `"Upload EMA weights (step N) with hf-ema"`.
        endpoint (`str`, *optional*): Hub endpoint; defaults to `HF_ENDPOINT` or https://huggingface.co.

    Returns:
        `str`: the URL of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    _check_str("repo_id", repo_id, optional=False)
    _check_str("subfolder", subfolder)
    _check_str("revision", revision)
    _check_str("commit_message", commit_message)
    if not isinstance(as_main, bool):
        raise ConfigTypeError(f"`as_main` must be a bool, got {as_main!r}")
    if not isinstance(private, bool):
        raise ConfigTypeError(f"`private` must be a bool, got {private!r}")
    if as_main and subfolder not in (None, EMA_DIRNAME):
        raise ConfigError(
            f"`as_main=True` uploads to the repository root; it cannot be combined with subfolder={subfolder!r}"
        )
    target = None if as_main or subfolder is None else subfolder.strip("/")
    if target is not None and (not target or ".." in target.split("/")):
        raise ConfigError(f"`subfolder` must be a relative folder inside the repository, got {subfolder!r}")

    ema_dir, run_dir = locate_ema_folder(path)
    state = read_ema_state(ema_dir)
    metrics = read_eval_metrics(ema_dir, run_dir)

    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    existing_card = _remote_text(api, repo_id, CARD_NAME, revision)

    prefix = f"{target}/" if target else ""
    operations = [
        CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(file))
        for rel, file in _files_to_upload(ema_dir)
    ]
    if target:
        sub_card = ema_card_text(ema_dir, repo_id, target, metrics)
        operations.append(CommitOperationAdd(path_in_repo=prefix + CARD_NAME, path_or_fileobj=sub_card.encode()))
    root_card = ema_card_text(ema_dir, repo_id, target, metrics, existing=existing_card)
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=root_card.encode()))

    message = commit_message or f"Upload EMA weights (step {state.get('step')}) with hf-ema"
    info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    logger.info("Pushed %s to %s (%s)", ema_dir, repo_id, info.commit_url)
    return str(info.commit_url)


# ---------------------------------------------------------------------- Trainer(push_to_hub=True)
def wait_for_pushes(callback: EMACallback) -> None:
    """Wait for the Trainer's background checkpoint uploads, which may be reading `output_dir/ema/`.

    Args:
        callback (`EMACallback`): The callback, bound to its trainer.
    """
    # `_finish_current_push` is the Trainer's own wait (used by `train()` and `push_to_hub()`); no public equivalent.
    finish = getattr(callback.trainer, "_finish_current_push", None)
    if callable(finish):
        finish()


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
    output_ema = Path(args.output_dir) / EMA_DIRNAME
    repo_id = _repo_id(callback, args)
    in_train = bool(getattr(callback.trainer, "is_in_train", False))
    if in_train:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / EMA_DIRNAME
        distributed = ema.layout.world_size > 1
        if distributed and callback._pushed_step != state.global_step:
            # Only when the hook could not be installed (a Trainer without `_push_from_checkpoint`).
            if not callback._warned_distributed_push:
                logger.warning(
                    "Checkpoint pushes under distributed training carry the EMA of the previous checkpoint "
                    "(the Trainer calls on_push_begin on the main process only); the final push is up to date."
                )
                callback._warned_distributed_push = True
            return
        if not folder.parent.is_dir():
            logger.warning("Checkpoint folder %s not found; the push carries no EMA for this step", folder.parent)
            return
        if not distributed:
            callback.save(folder, processing_class=processing_class, state=state)
            callback._pushed_step = state.global_step
        write_model_card(folder, repo_id=repo_id, log_history=state.log_history)
        wait_for_pushes(callback)
        _copy_folder(folder, output_ema)
        # Main process only under distributed training: `after_checkpoint_save` records the step on every process.
        callback._copied_step = state.global_step
        if not distributed:
            callback._output_step = state.global_step
        return
    if callback._output_step != state.global_step:
        wait_for_pushes(callback)
        callback.save(output_ema, processing_class=processing_class, state=state)
        callback._output_step = state.global_step
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
    callback._pushed_step = state.global_step


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
    original = getattr(trainer, "_push_from_checkpoint", None)
    if not callable(original) or getattr(original, "_hf_ema_wrapped", False):
        return
    callback_ref = weakref.ref(callback)

    @functools.wraps(original)
    def push_from_checkpoint(checkpoint_folder, *args: Any, **kwargs: Any):
        cb = callback_ref()
        if cb is not None:
            save_before_checkpoint_push(cb, checkpoint_folder)
        return original(checkpoint_folder, *args, **kwargs)

    push_from_checkpoint._hf_ema_wrapped = True
    trainer._push_from_checkpoint = push_from_checkpoint


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
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / EMA_DIRNAME
    already_copied = callback._copied_step == state.global_step  # by the push of this very checkpoint
    if ema.layout.is_main_process() and folder.is_dir() and not already_copied:
        wait_for_pushes(callback)
        _copy_folder(folder, Path(args.output_dir) / EMA_DIRNAME)
        write_model_card(
            Path(args.output_dir) / EMA_DIRNAME, repo_id=_repo_id(callback, args), log_history=state.log_history
        )
    # Every process records it, so that they all take the same branch in the collective final save.
    callback._output_step = state.global_step

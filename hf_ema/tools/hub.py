"""Pushing an `ema/` folder to the Hugging Face Hub: `push_ema`, behind `hf-ema push` (the `Trainer(push_to_hub=True)`
glue is in `hf_ema/trainer/hub_push.py`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..ema_folder import read_ema_state
from ..errors import ConfigError, ConfigTypeError
from ..utils.paths import EMA_DIRNAME
from .model_card import CARD_NAME, ema_card_text, locate_ema_folder, read_eval_metrics

__all__ = ["push_ema"]

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

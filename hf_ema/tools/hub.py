"""Pushing an `ema/` folder to the Hugging Face Hub: `push_ema`, behind `hf-ema push` (the `Trainer(push_to_hub=True)`
glue is in `hf_ema/trainer/hub_push.py`)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from ..compat.huggingface_hub import DEFAULT_TIMEOUT, bounded_requests, network_error_types
from ..ema_folder import read_ema_state
from ..errors import ConfigError, ConfigTypeError, HubError
from ..utils.paths import EMA_DIRNAME
from ..utils.validation import check_bool, is_number
from ..weighted_sum import check_safetensors_file
from .model_card import CARD_NAME, ema_card_text, locate_ema_folder, read_eval_metrics

__all__ = ["DEFAULT_TIMEOUT", "push_ema"]

logger = logging.getLogger(__name__)


def _check_str(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigTypeError(f"`{name}` must be a non-empty string, got {value!r}")


def _check_hub_names(repo_id: str, target: str | None) -> None:
    """huggingface_hub's own local checks of the repository id and of the folder in it, run before any work: they
    would otherwise fail mid-push with its `HFValidationError` / `ValueError` and a traceback."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(
            f"`repo_id` must be a Hub repository id like `user/my-model`, got {repo_id!r}: {_first_line(err)}"
        ) from None
    if target is not None:
        try:
            CommitOperationAdd(path_in_repo=f"{target}/{CARD_NAME}", path_or_fileobj=b"")
        except ValueError as err:
            raise ConfigError(
                f"`subfolder` must be a folder the Hub accepts, got {target!r}: {_first_line(err)}"
            ) from None


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n")[0].split())


def _files_to_upload(ema_dir: Path) -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ema_dir.rglob("*")):
        rel = path.relative_to(ema_dir).as_posix()
        # Skip atomic_folder leftovers (".name.tmp-*") and the local card, which is regenerated for the repo.
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == CARD_NAME:
            continue
        out.append((rel, path))
    return out


def _hub_token(token: str | None) -> str:
    """The token to push with: `token`, else `HF_TOKEN` or the saved login; fails before any upload is attempted."""
    if token is not None:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ConfigError(
            "pushing needs a Hugging Face token and none was found: pass `token`, set HF_TOKEN, or log in with "
            "`hf auth login`"
        )
    return found


def _check_online(endpoint: str) -> None:
    import huggingface_hub.constants as hub_constants

    if getattr(hub_constants, "HF_HUB_OFFLINE", False):
        raise HubError(f"pushing to {endpoint} needs the network, but HF_HUB_OFFLINE is set; unset it to push")


def _hub_failure(err: BaseException, endpoint: str, timeout: float) -> HubError | None:
    """One clear error for a request that failed (no answer, unreachable, refused), or `None` for anything else."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    timeouts, transport = network_error_types()
    if isinstance(err, OfflineModeIsEnabled):
        return HubError(f"pushing to {endpoint} needs the network, but HF_HUB_OFFLINE is set; unset it to push")
    if isinstance(err, timeouts):
        return HubError(
            f"the Hub at {endpoint} did not answer within {timeout:g} s ({type(err).__name__}); check the network "
            "and HF_ENDPOINT, or allow more time with `timeout`"
        )
    if isinstance(err, transport):
        detail = " ".join(str(err).split()) or type(err).__name__
        return HubError(f"could not reach the Hub at {endpoint}: {detail}; check the network and HF_ENDPOINT")
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        detail = _first_line(err)
        if status in (401, 403):
            return HubError(f"the Hub at {endpoint} refused the token (HTTP {status}): pass a valid `token`; {detail}")
        return HubError(f"the Hub at {endpoint} refused the push (HTTP {status}): {detail}")
    return None


def _check_local_files(ema_dir: Path, files: list[tuple[str, Path]]) -> dict[str, Any]:
    """Read the EMA state and check every weights file, so a corrupt folder fails before anything is uploaded."""
    state = read_ema_state(ema_dir)
    for rel, file in files:
        if rel.endswith(".safetensors"):
            check_safetensors_file(file)
    return state


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
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Upload an EMA to a Hub repository, with a model card saying it is an EMA, in one commit.

    The repository is created when missing. The EMA folder goes to `subfolder/` (load it with
    `from_pretrained(repo_id, subfolder="ema")`) with its own `README.md`, and the repository's `README.md` gets an
    EMA section (added to the existing card, or replacing the EMA section of an earlier push). With `as_main=True`
    the EMA files go to the repository root and become its main weights. The card gives the EMA's decay and step
    and the raw vs EMA evaluation metrics when they were recorded (see [`read_eval_metrics`]). Local files are not
    modified.

    Nothing touches the network before the arguments, the token and every local file have been checked. Every
    request is bounded by `timeout`, so an endpoint that accepts the connection and never answers fails with a
    [`HubError`] instead of hanging.

    Args:
        path (`str` or `os.PathLike`): An `ema/` folder, a checkpoint folder or a run folder holding `ema/`.
        repo_id (`str`): The repository, e.g. `"user/my-model"`.
        subfolder (`str`, *optional*, defaults to `"ema"`): Folder of the repository to upload into; `None` means
            the root (same as `as_main=True`).
        as_main (`bool`, *optional*, defaults to `False`): Make the EMA the repository's main weights.
        private (`bool`, *optional*, defaults to `False`): Create the repository as private (no effect if it exists).
        revision (`str`, *optional*): Branch to commit to (created from the default branch when missing).
        token (`str`, *optional*): Hub token; defaults to the `HF_TOKEN` variable or the saved login. Without any,
            the push fails before the first request.
        commit_message (`str`, *optional*): Defaults to `"Upload EMA weights (step N) with hf-ema"`.
        endpoint (`str`, *optional*): Hub endpoint; defaults to `HF_ENDPOINT` or https://huggingface.co.
        timeout (`float`, *optional*, defaults to `DEFAULT_TIMEOUT` (30)): Seconds any one request may go without
            progress (connecting, between two reads, between two writes).

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ConfigError`: on invalid arguments or when no token is found.
        `CheckpointError`: when `path` holds no EMA or a corrupt file.
        `HubError`: when the Hub cannot be reached, does not answer within `timeout` or refuses the push.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    _check_str("repo_id", repo_id, optional=False)
    _check_str("subfolder", subfolder)
    _check_str("revision", revision)
    _check_str("commit_message", commit_message)
    check_bool("as_main", as_main)
    check_bool("private", private)
    if as_main and subfolder not in (None, EMA_DIRNAME):
        raise ConfigError(
            f"`as_main=True` uploads to the repository root; it cannot be combined with subfolder={subfolder!r}"
        )
    target = None if as_main or subfolder is None else subfolder.strip("/")
    if target is not None and (not target or ".." in target.split("/")):
        raise ConfigError(f"`subfolder` must be a relative folder inside the repository, got {subfolder!r}")
    _check_hub_names(repo_id, target)
    if not is_number(timeout) or not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"`timeout` must be a number of seconds > 0, got {timeout!r}")
    _check_str("token", token)

    ema_dir, run_dir = locate_ema_folder(path)
    files = _files_to_upload(ema_dir)
    state = _check_local_files(ema_dir, files)
    metrics = read_eval_metrics(ema_dir, run_dir)
    # The token before any request; `get_token` itself may refresh a saved OAuth login, so it is bounded too.
    with bounded_requests(timeout):
        token = _hub_token(token)

    api = HfApi(endpoint=endpoint, token=token)
    _check_online(api.endpoint)
    with bounded_requests(timeout):
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            existing_card = _remote_text(api, repo_id, CARD_NAME, revision)

            prefix = f"{target}/" if target else ""
            operations = [
                CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(file)) for rel, file in files
            ]
            if target:
                sub_card = ema_card_text(ema_dir, repo_id, target, metrics)
                operations.append(
                    CommitOperationAdd(path_in_repo=prefix + CARD_NAME, path_or_fileobj=sub_card.encode())
                )
            root_card = ema_card_text(ema_dir, repo_id, target, metrics, existing=existing_card)
            operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=root_card.encode()))

            message = commit_message or f"Upload EMA weights (step {state.get('step')}) with hf-ema"
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
        except Exception as err:
            failure = _hub_failure(err, api.endpoint, timeout)
            if failure is None:
                raise
            raise failure from err
    logger.info("Pushed %s to %s (%s)", ema_dir, repo_id, info.commit_url)
    return str(info.commit_url)

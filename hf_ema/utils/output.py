"""The one rule for every folder hf-ema writes (merge, post-hoc EMA, the demo run, `raw/` of `swap_at_end`).

An output folder never equals, contains or lies inside a folder the command reads, is never a training run folder,
and is replaced (with `overwrite=True`) only when hf-ema wrote it: every output folder gets a marker file
([`MARKER_NAME`]) when it is created, and a folder without one is never replaced, whatever the flags.

Library errors name the argument as the caller spelled it (`output_dir`, `overwrite=True`); the CLI maps those names
to its flags (`--out`, `--overwrite`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError
from .jsonio import write_json
from .paths import MARKER_NAME, is_run_folder

__all__ = ["OutputFolderError", "is_hf_ema_output", "mark_output", "prepare_output"]


class OutputFolderError(ConfigError):
    """An output folder would destroy an input or a folder hf-ema did not write, or is of the wrong kind."""


def is_hf_ema_output(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written by hf-ema (it holds the marker file).

    Args:
        folder (`str` or `os.PathLike`): The folder.
    """
    return (Path(folder) / MARKER_NAME).is_file()


def mark_output(folder: str | os.PathLike, kind: str) -> Path:
    """Write the marker that tells a later `overwrite=True` this folder is hf-ema's to replace.

    Call it on the temporary folder of an atomic write, so the marker appears with the folder.

    Args:
        folder (`str` or `os.PathLike`): The output folder (it must exist).
        kind (`str`): What wrote it (`"merge"`, `"posthoc"`, `"demo"`, `"raw"`), recorded in the marker.

    Returns:
        `Path`: the marker file.
    """
    path = Path(folder) / MARKER_NAME
    write_json(path, {"written_by": "hf-ema", "kind": kind}, indent=None)
    return path


def _relation(out: Path, folder: Path) -> str | None:
    """How `out` relates to `folder`: "is", "contains", "lies inside" or None, after resolving links."""
    ro, rf = out.resolve(), folder.resolve()
    if ro == rf:
        return "is"
    if ro in rf.parents:
        return "contains"
    if rf in ro.parents:
        return "lies inside"
    return None


def prepare_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    *,
    what: str = "`output_dir`",
    overwrite_arg: str = "overwrite",
    allow_run_folder: bool = False,
) -> Path:
    """Check that `out` may be written, before any work starts; raise [`OutputFolderError`] otherwise.

    `out` may not exist yet (its parents are created by the write), or be an empty folder, or a folder hf-ema wrote
    (with the marker) when `overwrite` is set. Refused, whatever `overwrite` says: `out` equal to, containing or
    inside one of `inputs`; a training run folder (unless `allow_run_folder` and hf-ema wrote it, as for the demo's
    own run); a non-empty folder without the marker; a file; a path below a file. Nothing is deleted here: the
    caller replaces the folder atomically (or, for the demo run, removes it after this check).

    Args:
        out (`str` or `os.PathLike`): The output folder.
        inputs (`Iterable[str | os.PathLike]`, *optional*): Every folder the command reads.
        overwrite (`bool`, *optional*, defaults to `False`): Whether the caller asked to replace an hf-ema output.
        what (`str`, *optional*, defaults to ``"`output_dir`"``): How the messages name `out` (the argument).
        overwrite_arg (`str`, *optional*, defaults to `"overwrite"`): The argument that allows replacing, for the
            message (`"force"` for the demo).
        allow_run_folder (`bool`, *optional*, defaults to `False`): `out` is itself a run folder hf-ema trains into.

    Returns:
        `Path`: `out`.
    """
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise OutputFolderError(f"{what} must be a folder path, got {out!r}")
    out = Path(out)
    for folder in inputs:
        relation = _relation(out, Path(folder))
        if relation is not None:
            raise OutputFolderError(
                f"{what} `{out}` {relation} the input `{folder}`; writing there would destroy what is read, "
                "choose another folder"
            )
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{what} `{out}` is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFolderError(f"{what} `{out}` cannot be created: `{parent}` is a file")
            break
    if not out.is_dir():
        return out
    marked = is_hf_ema_output(out)
    if is_run_folder(out) and not (allow_run_folder and marked):
        raise OutputFolderError(
            f"{what} `{out}` is a training run folder; hf-ema never writes over one, choose a new folder"
        )
    if not any(out.iterdir()):
        return out
    if not marked:
        raise OutputFolderError(
            f"{what} `{out}` exists, is not empty and was not written by hf-ema (no {MARKER_NAME} file); "
            "hf-ema only replaces folders it wrote, choose a new folder"
        )
    if not overwrite:
        raise OutputFolderError(f"{what} `{out}` exists; pass {overwrite_arg}=True to replace it")
    return out

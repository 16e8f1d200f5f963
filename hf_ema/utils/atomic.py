"""Crash-safe writes: a folder is built under a temporary name and renamed into place, so a reader only ever sees
a complete folder (the old one or the new one), never a partial one.

Replacing an existing folder takes two renames (`path -> .path.old-X`, `.path.tmp-X -> path`). A crash between them
leaves no `path` but a complete `.path.old-X`: [`recover_folder`] (called by every reader and by the next write)
renames it back. Temporary folders of an interrupted write are removed by the next write to the same path.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

__all__ = ["atomic_folder", "clean_leftovers", "commit_folder", "leftover_folders", "recover_folder", "temporary_name"]

logger = logging.getLogger(__name__)

_TMP = ".tmp-"
_OLD = ".old-"


def temporary_name(path: str | os.PathLike, token: str | None = None) -> Path:
    """The temporary sibling a new `path` is built in (`.NAME.tmp-TOKEN`). Ranks that build one folder together pass
    the same `token`."""
    path = Path(path)
    return path.parent / f".{path.name}{_TMP}{token or uuid.uuid4().hex[:8]}"


def leftover_folders(path: str | os.PathLike) -> list[Path]:
    """Temporary (`.NAME.tmp-*`) and replaced (`.NAME.old-*`) siblings of `path` left by interrupted writes."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}{_TMP}", f".{path.name}{_OLD}")
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefixes))


def recover_folder(path: str | os.PathLike) -> bool:
    """Bring back the previous `path` when a replace was interrupted between its two renames.

    Returns:
        `bool`: whether a folder was recovered.
    """
    path = Path(path)
    if path.exists():
        return False
    olds = [p for p in leftover_folders(path) if p.name.startswith(f".{path.name}{_OLD}")]
    if not olds:
        return False
    newest = max(olds, key=lambda p: p.stat().st_mtime)
    try:
        os.replace(newest, path)
    except OSError:  # another process recovered it first
        return path.exists()
    logger.warning("recovered %s from an interrupted replace (%s)", path, newest.name)
    return True


def clean_leftovers(path: str | os.PathLike, keep: Path | None = None) -> None:
    """Recover an interrupted replace of `path`, then remove the temporary folders interrupted writes left beside it.

    Args:
        path (`str` or `os.PathLike`): The folder.
        keep (`Path`, *optional*): A temporary folder in use, left alone.
    """
    path = Path(path)
    recover_folder(path)
    for leftover in leftover_folders(path):
        if leftover != keep:
            shutil.rmtree(leftover, ignore_errors=True)


class atomic_folder:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager that builds a folder under a temporary name and renames it into place on success.

    On an exception the temporary folder is removed and an existing folder at `path` is left untouched, so a crash
    never leaves a partial folder. Entering it first recovers an interrupted replace and removes the temporary
    folders earlier interrupted writes of `path` left behind.

    ```python
    with atomic_folder("run/checkpoint-10/ema") as tmp:
        write_files(tmp)
    ```

    Args:
        path (`str` or `os.PathLike`): The final folder.
        token (`str`, *optional*): The suffix of the temporary folder; ranks writing into one folder pass the same
            token. A random one by default.
    """

    def __init__(self, path: str | os.PathLike, token: str | None = None) -> None:
        self.path = Path(path)
        self.tmp = temporary_name(self.path, token)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path, keep=self.tmp)
        self.tmp.mkdir(exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            commit_folder(self.tmp, self.path)
        except BaseException:
            # A failed rename (an interrupted replace is recovered by the next reader) leaves no temporary folder.
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def commit_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the complete folder `tmp` to `path`, replacing `path` if it exists (two renames; see the module doc)."""
    tmp, path = Path(tmp), Path(path)
    _fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}{_OLD}{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    # Make the renames durable: a power loss after the call must not bring back the previous state.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

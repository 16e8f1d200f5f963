"""Reading and writing the small JSON files hf-ema keeps (`ema_state.json`, `ema_config.json`, recipes, results):
one place for the encoding, the layout and the error a damaged file gives."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = ["read_json", "write_json"]


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path` (UTF-8).

    Args:
        path (`str` or `os.PathLike`): The file.

    Raises:
        `OSError`: `path` cannot be read (`FileNotFoundError` when it does not exist).
        `CheckpointError`: `path` is not valid UTF-8 JSON (a truncated or damaged file), named in the message.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"could not read `{path}`: {type(err).__name__}: {err}") from None


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `data` to `path` as UTF-8 JSON, ending with a newline.

    Callers that must never leave a half-written file write it inside an `atomic_folder` (hf_ema.utils.atomic).

    Args:
        path (`str` or `os.PathLike`): The file (replaced if it exists).
        data (`Any`): A JSON-serialisable value.
        indent (`int`, *optional*, defaults to 2): Indentation; `None` for one line.
        sort_keys (`bool`, *optional*, defaults to `False`): Sort the keys of every object.
    """
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")
    return path

"""The plain EMA of a bias-corrected (BEMA) `ema/` folder, written as a loadable folder of its own: to compare BEMA
with the EMA it corrects (the app's `ema-plain` pane), or to publish that EMA instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..ema_folder import read_ema_state
from ..errors import CheckpointError
from ..utils.atomic import atomic_folder
from ..utils.output import mark_output, prepare_output

__all__ = ["write_plain_ema"]


def _plain_tensors(ema_dir: Path, meta: dict) -> dict[str | None, dict]:
    """The plain EMA's tensors, by the weights file and key that hold the corrected values."""
    locations, weights = meta.get("tensors") or {}, meta.get("weights") or {}
    out: dict[str | None, dict] = {}
    for name in meta.get("names") or []:
        where = locations.get(name)
        if where is None:
            raise CheckpointError(f"`{ema_dir}` has no exact copy of {name!r}; was it written by hf-ema?")
        # Where hf-ema laid the weights out it recorded their keys; a folder the library wrote uses the names.
        target = weights.get(name) or {"file": None, "key": name}
        with safe_open(str(ema_dir / where["file"]), framework="pt") as f:
            out.setdefault(target["file"], {})[target["key"]] = f.get_tensor(where["key"])
    return out


def write_plain_ema(ema_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the plain EMA of a BEMA `ema/` folder (its `ema_state.safetensors`, in the weights' dtypes and under the
    weights' keys) as a folder that `from_pretrained` / `PeftModel.from_pretrained` load, atomically.

    Args:
        ema_dir (`str` or `os.PathLike`): An `ema/` folder of a bias-corrected EMA (`EMAConfig(bema=...)`).
        output_dir (`str` or `os.PathLike`): The folder to write (never one hf-ema did not write).
        overwrite (`bool`, *optional*, defaults to `False`): Replace an earlier output of hf-ema.

    Returns:
        `Path`: the folder written.

    Raises:
        `CheckpointError`: the folder is not a BEMA `ema/` folder.
    """
    ema_dir = Path(ema_dir)
    meta = read_ema_state(ema_dir)
    if not isinstance((meta.get("config") or {}).get("bema"), dict):
        raise CheckpointError(f"`{ema_dir}` is not a BEMA `ema/` folder: its weights already are the plain EMA")
    output_dir = prepare_output(output_dir, [ema_dir], overwrite, what="`output_dir`")
    tensors = _plain_tensors(ema_dir, meta)
    with atomic_folder(output_dir) as tmp:
        mark_output(tmp, "plain_ema")
        for path in ema_dir.iterdir():
            if path.is_file() and not path.name.startswith("ema_state"):
                shutil.copy2(path, tmp / path.name)
        for path in sorted(tmp.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not iterable
            for file in (path.name, None):
                for key, value in tensors.get(file, {}).items():
                    if key in state:
                        state[key] = value.to(state[key].dtype)
            save_file(state, str(path), metadata=metadata)
    return output_dir

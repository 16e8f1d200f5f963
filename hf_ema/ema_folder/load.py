"""Reading an `ema/` folder back: `read_ema_state` and `load_ema` (each rank reads only its own byte ranges)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..model_ema import ModelEMA
from ..utils.atomic import recover_folder
from ..utils.jsonio import read_json
from ..utils.paths import STATE_NAME
from ..utils.safetensors_files import dtype_from_name, read_elements, read_header
from ..utils.validation import check_bool
from .commit import FORMAT_VERSION
from .format1 import read_format1
from .resume import check_finite, check_state, plan_resume

__all__ = ["load_ema", "read_ema_state"]


def read_ema_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Read `ema_state.json` from an `ema/` folder.

    Args:
        folder (`str` or `os.PathLike`): The `ema/` folder.
    """
    recover_folder(folder)  # a replace interrupted between its two renames
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"`{folder}` is not an hf-ema folder: {STATE_NAME} is missing")
    try:
        state = read_json(path)
    except OSError as err:  # unreadable: one clear line (a garbled file is a CheckpointError from read_json)
        raise CheckpointError(f"could not read `{path}`: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"`{path}` is corrupt: it is not a JSON object")
    return state


class _Headers:
    """The headers of the folder's safetensors files, each read once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._read: dict[str, tuple[int, dict]] = {}

    def entry(self, file: str, key: str) -> tuple[int, dict | None]:
        """Where the data of `file` starts, and the header entry of `key` (`None` when it has none)."""
        if file not in self._read:
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"`{self.folder}` is incomplete: its {STATE_NAME} names {file}, missing")
            start, header, _ = read_header(path)
            self._read[file] = (start, header)
        start, header = self._read[file]
        entry = header.get(key)
        if entry is not None and not (
            isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
        ):
            raise CheckpointError(f"`{self.folder / file}` is corrupt: its header entry {key!r} is {entry!r}")
        return start, entry


def _read_parts(ema: ModelEMA, folder: Path, meta: dict[str, Any], skip: set[str]) -> dict[str, torch.Tensor]:
    """This rank's part of each EMA tensor but those in `skip`, read from the file and key that `ema_state.json`
    names for it (its byte range only: nothing is gathered, whatever the world size that wrote the folder)."""
    locations = meta.get("tensors") or {}
    headers = _Headers(folder)
    out: dict[str, torch.Tensor] = {}
    for t in ema.named_tensors():
        if t.name in skip:
            continue
        where = locations.get(t.name)
        if where is None:
            raise CheckpointError(f"`{folder}` has no tensor {t.name!r}; was it saved for another model?")
        out[t.name] = _read_part(ema, headers, t.name, where, t.ema)
    return out


def _read_theta0(ema: ModelEMA, folder: Path, meta: dict[str, Any], skip: set[str]) -> dict[str, torch.Tensor] | None:
    """This rank's part of BEMA's `theta_0` of each averaged tensor but those in `skip`, when the folder has it (a
    bias-corrected EMA saved after its burn-in)."""
    locations = meta.get("bema_theta0")
    correction = ema.bias_correction
    if not locations or correction is None:
        return None
    headers = _Headers(folder)
    out: dict[str, torch.Tensor] = {}
    for name, like in zip(ema.names, correction.theta0):
        if name in skip:
            continue
        where = locations.get(name)
        if where is None:
            raise CheckpointError(f"`{folder}` has no BEMA theta_0 of {name!r}; was it saved for another model?")
        out[name] = _read_part(ema, headers, name, where, like)
    return out


def _read_part(ema: ModelEMA, headers: _Headers, name: str, where: dict[str, str], like: torch.Tensor) -> torch.Tensor:
    """This rank's part of tensor `name`, read from `where` into a tensor shaped, typed and placed like `like`."""
    folder = headers.folder
    path = folder / where["file"]
    start, entry = headers.entry(where["file"], where["key"])
    piece = ema.layout.ema_piece(name, like)
    if entry is None or tuple(entry["shape"]) != tuple(piece.shape):
        shape = None if entry is None else tuple(entry["shape"])
        raise CheckpointError(
            f"`{folder}` holds {name!r} with shape {shape} but this model's has {tuple(piece.shape)}; was it saved "
            f"for another model?"
        )
    if piece.start is None:  # not one contiguous range (a DTensor sharded on another dim)
        with safe_open(str(path), framework="pt") as f:
            return ema.layout.shard_full_tensor(name, f.get_tensor(where["key"]), like)
    file_dtype = dtype_from_name(entry["dtype"])
    size = torch.empty((), dtype=file_dtype).element_size()
    target = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    read_elements(path, start + entry["data_offsets"][0] + piece.start * size, piece.numel, file_dtype, target)
    if piece.numel < target.numel():  # the padding of the last ZeRO-3 partition
        target.view(-1)[piece.numel :].zero_()
    return target


@torch.no_grad()
def load_ema(ema: ModelEMA, folder: str | os.PathLike, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Restore `ema` from an `ema/` folder written by `save_ema` (resume). Every rank calls it; not a collective.

    Each rank reads only its own part of each tensor (a byte range of the file that holds it exactly), whatever the
    number of ranks that wrote the folder. Folders of format 1 (with `shards/`) are read too.

    The folder must have been saved with the same settings in every field of [`EMAConfig`] that changes the average
    (`config.MATH_FIELDS`: the schedule, `dtype`, and the tensor selection when it selects other tensors); the
    others (`device`, `async_update`, `cuda_stream`, `shard_across_ranks`, `on_nonfinite`) may change. With
    `allow_config_change=True` the EMA goes on with its own settings from the folder's step: the new schedule
    applies from the next update, tensors it now averages and the folder lacks start from the current weights (with
    a warning naming them), tensors it no longer averages leave it, and a new `dtype` is a cast of the saved values.
    `ema.config_history` (saved in `ema_state.json`) records each config with the step it took effect.

    Args:
        ema (`ModelEMA`): The EMA to restore, built for the same model.
        folder (`str` or `os.PathLike`): The `ema/` folder.
        allow_config_change (`bool`, *optional*, defaults to `False`): Go on with `ema`'s settings when they differ
            from the folder's in a way that changes the average.

    Returns:
        `dict`: the folder's `ema_state.json`.

    Raises:
        `CheckpointError`: the folder is not an EMA folder, is corrupt or incomplete (the message names the file),
            is newer than this hf-ema, holds another model, or holds NaN or inf (unless `on_nonfinite="ignore"`).
        `ConfigMismatchError`: the settings changed and `allow_config_change` is `False`.
    """
    check_bool("allow_config_change", allow_config_change)
    folder = Path(folder)
    meta = read_ema_state(folder)
    version = check_state(meta, folder)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"`{folder}` was written by a newer hf-ema (format {meta['format_version']}); upgrade hf-ema to read it"
        )
    plan = plan_resume(ema, folder, meta, allow_config_change)
    ema.wait()
    skip = set(plan.new_tensors)
    tensors = _read_parts(ema, folder, meta, skip) if version >= 2 else read_format1(ema, folder, meta, skip)
    check_finite(ema, folder, tensors)
    state = {"tensors": tensors, "step": meta["step"], "num_updates": meta["num_updates"]}
    state.update(num_skipped=meta.get("num_skipped", 0), decay=meta.get("decay"))
    state.update(update_intervals=meta.get("update_intervals"), last_interval=meta.get("last_interval"))
    state["bema_theta0"] = _read_theta0(ema, folder, meta, skip) if version >= 2 else None
    ema.load_state_dict(state, strict=not skip)
    plan.apply(ema, meta, folder)
    return meta

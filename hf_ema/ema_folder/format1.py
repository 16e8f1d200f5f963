"""Reading `ema/` folders of format 1 (hf-ema before every rank wrote its part of the weights files in place): the
exact copy or the weights under the names `save_pretrained` uses, re-sharded for this rank, or, when the layout
kind, world size and shapes all match, this rank's own file in `shards/` (see docs/reference/ema_format.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..model_ema import ModelEMA
from ..sharding.rank_files import rank_shard_path
from ..utils.jsonio import read_json
from ..utils.paths import TENSORS_NAME

__all__ = ["read_format1", "read_rank_shard"]

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model", "diffusion_pytorch_model")


def read_rank_shard(
    ema: ModelEMA, folder: str | os.PathLike, meta: dict[str, Any], skip: frozenset[str] | set[str] = frozenset()
) -> dict[str, torch.Tensor] | None:
    """This rank's EMA shards from a format-1 `folder/shards/` file, when they fit this EMA; not a collective.

    Args:
        ema (`ModelEMA`): The EMA to restore.
        folder (`str` or `os.PathLike`): The `ema/` folder.
        meta (`dict`): The folder's `ema_state.json`.
        skip (`set[str]`, *optional*): Tensors not to read (the folder lacks them).

    Returns:
        `dict` or `None`: the tensors by name, or `None` when they do not fit (the caller re-shards the full weights).
    """
    layout = ema.layout
    if not layout.is_sharded:
        return None
    path = rank_shard_path(folder, layout.rank, layout.world_size)
    if not path.is_file():
        if meta.get("layout") == layout.kind and meta.get("world_size") == layout.world_size:
            logger.warning("EMA shard file %s is missing; re-sharding the full EMA weights instead", path)
        return None
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
        if info.get("layout") != layout.kind or info.get("world_size") != str(layout.world_size):
            return None
        if info.get("step") != str(meta.get("step")):
            logger.warning(
                "EMA shard file %s is from step %s, not %s; ignoring it", path, info.get("step"), meta["step"]
            )
            return None
        keys = set(f.keys())
        ours = [t for t in ema.named_tensors() if t.name not in skip]
        if not {t.name for t in ours} <= keys:
            return None
        tensors: dict[str, torch.Tensor] = {}
        for t in ours:
            src = f.get_tensor(t.name)
            if tuple(src.shape) != tuple(t.ema.shape):
                # Another wrapping of the model (e.g. another FSDP auto-wrap policy): shards do not line up.
                logger.info(
                    "EMA shard %s has shape %s here, %s in %s; re-sharding", t.name, t.ema.shape, src.shape, path
                )
                return None
            tensors[t.name] = src
    return tensors


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error types: a damaged or truncated file
        raise CheckpointError(f"could not read `{path}`: {type(err).__name__}: {err}") from None


def _read_full_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # The exact copy when there is one, else the weights under the names `save_pretrained` and diffusers'
    # `save_pretrained` use (one file or an index).
    exact = folder / TENSORS_NAME
    if exact.is_file():
        return _load_file(exact)
    for stem in _WEIGHT_FILES:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return _load_file(single)
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index)["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for name in files:
                out.update(_load_file(folder / name))
            return out
    raise CheckpointError(f"`{folder}` holds no EMA weights ({TENSORS_NAME} or model.safetensors)")


def read_format1(ema: ModelEMA, folder: Path, meta: dict[str, Any], skip: set[str]) -> dict[str, torch.Tensor]:
    """This rank's part of each EMA tensor but those in `skip`, from a format-1 folder (not a collective).

    Args:
        ema (`ModelEMA`): The EMA to restore.
        folder (`Path`): The `ema/` folder.
        meta (`dict`): Its `ema_state.json`.
        skip (`set[str]`): Tensors not to read (the folder lacks them).
    """
    own = read_rank_shard(ema, folder, meta, skip)
    if own is not None:
        return own
    full = _read_full_tensors(folder)
    tensors: dict[str, torch.Tensor] = {}
    for t in ema.named_tensors():
        if t.name in skip:
            continue
        names = [t.name, *ema.selection.aliases.get(t.name, [])]
        source = next((full[n] for n in names if n in full), None)
        if source is None:
            raise CheckpointError(f"`{folder}` has no tensor {t.name!r}; was it saved for another model?")
        tensors[t.name] = ema.layout.shard_full_tensor(t.name, source, t.ema)
    return tensors

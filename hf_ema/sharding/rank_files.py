"""Per-rank files: one safetensors file per rank (`rank-RRRRR-of-WWWWW.safetensors`), written atomically.

Used for state that only exists per rank (the oscillation tracker of `stability`), and read for the per-rank EMA
shard files of format-1 `ema/` folders (`ema/shards/`, written by hf-ema before every rank wrote its part of the
weights files in place, see docs/reference/ema_format.md): a format-1 checkpoint resumes from them when the layout
kind, world size and shapes all match; otherwise from the full weights (`layout.shard_full_tensor`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from ..model_ema import ModelEMA

__all__ = [
    "SHARDS_DIRNAME",
    "read_rank_shard",
    "rank_file_name",
    "rank_shard_path",
    "save_file_atomic",
]

logger = logging.getLogger(__name__)

SHARDS_DIRNAME = "shards"


def rank_file_name(rank: int, world_size: int) -> str:
    """Name of the file that rank `rank` of `world_size` writes: `rank-RRRRR-of-WWWWW.safetensors`.

    Args:
        rank (`int`): The rank.
        world_size (`int`): Number of ranks.
    """
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def rank_shard_path(folder: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Path of rank `rank`'s shard file inside an `ema/` folder.

    Args:
        folder (`str` or `os.PathLike`): The `ema/` folder.
        rank (`int`): The rank.
        world_size (`int`): Number of ranks that wrote shards.
    """
    return Path(folder) / SHARDS_DIRNAME / rank_file_name(rank, world_size)


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name in the same folder, then rename it into place: a crash or an
    error mid-write leaves the previous file (or none) and no partial one. Creates the folder when missing.

    Args:
        tensors (`dict[str, torch.Tensor]`): Contiguous CPU tensors.
        path (`str` or `os.PathLike`): The file to write.
        metadata (`dict[str, str]`): The safetensors metadata.

    Returns:
        `Path`: the file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_rank_shard(ema: ModelEMA, folder: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """This rank's EMA shards from a format-1 `folder/shards/` file, when they fit this EMA; not a collective.

    Args:
        ema (`ModelEMA`): The EMA to restore.
        folder (`str` or `os.PathLike`): The `ema/` folder.
        meta (`dict`): The folder's `ema_state.json`.

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
        ours = list(ema.named_tensors())
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

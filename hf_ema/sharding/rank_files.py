"""Per-rank files: one safetensors file per rank (`rank-RRRRR-of-WWWWW.safetensors`), written atomically.

Used for state that only exists per rank (the oscillation tracker of `stability`); format-1 `ema/` folders hold the
EMA's per-rank shards under the same names in `ema/shards/` (read by `hf_ema.ema_folder.format1`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "SHARDS_DIRNAME",
    "rank_file_name",
    "rank_shard_path",
    "save_file_atomic",
]

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

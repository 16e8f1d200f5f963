"""Sharding: how each averaged tensor maps to the shard this rank holds (replicated, DDP-sharded, FSDP1, FSDP2,
DeepSpeed ZeRO-3), where each rank's part of a tensor lies in the full tensor, and per-rank files."""

from .base import ReplicatedLayout, ShardedLayoutBase, ShardLayout
from .collectives import comm_device, dist_ready
from .detect import detect_layout
from .rank_files import rank_file_name, save_file_atomic

__all__ = [
    "ReplicatedLayout",
    "ShardLayout",
    "ShardedLayoutBase",
    "comm_device",
    "detect_layout",
    "dist_ready",
    "rank_file_name",
    "save_file_atomic",
]

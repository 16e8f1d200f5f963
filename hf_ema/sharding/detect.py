"""Which layout a model's EMA takes: replicated, DDP-sharded, FSDP1, FSDP2 or ZeRO-3."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import ReplicatedLayout, ShardLayout
from .collectives import dist_ready
from .ddp import DDPShardedLayout
from .fsdp import FSDP1Layout, FSDP2Layout, is_fsdp1, is_fsdp2
from .zero3 import ZeRO3Layout, is_zero3

if TYPE_CHECKING:
    from ..config import EMAConfig

__all__ = ["detect_layout"]


def detect_layout(model: nn.Module, config: EMAConfig | None = None) -> ShardLayout:
    """The layout of a model as the Trainer / accelerate prepared it.

    In order: FSDP2 / DTensor parameters, FSDP1 (`FullyShardedDataParallel` with `use_orig_params=True`),
    DeepSpeed ZeRO-3 partitioned parameters; otherwise the model is replicated, and the EMA is sharded across
    ranks when `config.shard_across_ranks` is `True`, or `None` with more than one rank.

    Args:
        model (`nn.Module`): The (possibly wrapped) model.
        config (`EMAConfig`, *optional*): The EMA configuration (for `shard_across_ranks`).

    Raises:
        `ConfigError`: FSDP1 without `use_orig_params=True`, or ZeRO-3 parameters offloaded to NVMe.
    """
    if is_fsdp2(model):
        return FSDP2Layout(model)
    if is_fsdp1(model):
        return FSDP1Layout(model)
    if is_zero3(model):
        return ZeRO3Layout(model)
    shard = None if config is None else getattr(config, "shard_across_ranks", None)
    if dist_ready() and torch.distributed.get_world_size() > 1 and shard is not False:
        return DDPShardedLayout()
    return ReplicatedLayout()

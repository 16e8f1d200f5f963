"""How each averaged tensor maps to the shard this rank holds, and how to rebuild the full tensor at save time.

`ModelEMA` never touches a full tensor of a sharded model during training: it averages `layout.local(...)` and
asks the layout for the full tensor only when it writes a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ReplicatedLayout", "ShardLayout", "detect_layout"]


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


class ShardLayout:
    """Base class: maps between the model's live tensors, the local shards the EMA holds and full tensors.

    Subclasses handle one way of sharding a model. The base class is the unsharded case.
    """

    #: Short name shown in logs and saved in the EMA state.
    kind: str = "replicated"

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the EMA reads after each step and writes when it swaps in: this rank's shard, as a view
        sharing storage with the model.

        Args:
            name (`str`): The tensor's name in the model.
            tensor (`torch.Tensor`): The live parameter or buffer.
        """
        return tensor.detach()

    def full_tensor(self, name: str, local_ema: torch.Tensor) -> torch.Tensor | None:
        """The full (unsharded) tensor for `local_ema`; a collective call that every rank makes in the same order.

        Returns the tensor on the main process and `None` elsewhere.

        Args:
            name (`str`): The tensor's name.
            local_ema (`torch.Tensor`): This rank's EMA shard.
        """
        return local_ema if self.is_main_process() else None

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor (used to re-shard a saved full EMA on resume).

        Args:
            name (`str`): The tensor's name.
            full (`torch.Tensor`): The full tensor.
            local_like (`torch.Tensor`): This rank's current shard, for shape and dtype.
        """
        return full

    def is_main_process(self) -> bool:
        """Whether this rank writes files."""
        return _is_main_process()

    def barrier(self) -> None:
        """Wait for every rank (no-op outside `torch.distributed`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @property
    def rank(self) -> int:
        """This process's rank (0 outside `torch.distributed`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes (1 outside `torch.distributed`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1


class ReplicatedLayout(ShardLayout):
    """Every rank holds full tensors (single process, DDP): the EMA holds full tensors too."""


def detect_layout(model: nn.Module) -> ShardLayout:
    """The layout of a model as the Trainer / accelerate prepared it.

    Args:
        model (`nn.Module`): The (possibly wrapped) model.
    """
    return ReplicatedLayout()

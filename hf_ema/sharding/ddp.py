"""The EMA of a replicated (DDP) model sharded across data-parallel ranks: each rank averages 1/N of each tensor.

Under DDP every rank holds the same weights, so keeping a full EMA on every rank is N copies of the same thing.
Here rank `r` averages only the `r`-th chunk (`torch.chunk` split) of each flattened tensor. The chunks are
described as a `DTensor` sharded on dim 0 of the flattened tensor, so gathering them (at save time, and when the
EMA is swapped into the model) is DTensor's own `full_tensor()`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import ConfigError
from .base import FlatPiece, ShardLayout
from .collectives import all_gather_object, comm_device

if TYPE_CHECKING:
    from ..config import EMAConfig
    from ..selection import Selection

__all__ = ["DDPShardedLayout", "chunk_bounds"]


def chunk_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """`[start, end)` of rank `rank`'s chunk of a flat tensor of `numel` elements, as `torch.chunk` /
    `DTensor`'s `Shard(0)` split it: chunks of `ceil(numel / world_size)`, the last ones shorter or empty.

    Args:
        numel (`int`): Number of elements.
        rank (`int`): The rank.
        world_size (`int`): Number of ranks.
    """
    chunk = math.ceil(numel / world_size) if numel else 0
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


class DDPShardedLayout(ShardLayout):
    """The model is replicated; the EMA of each tensor is split across the ranks of the default process group."""

    kind = "ddp_sharded"
    is_sharded = True

    def __init__(self) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        group = torch.distributed.group.WORLD
        self._device = comm_device(group)
        self._mesh = DeviceMesh.from_group(cast(torch.distributed.ProcessGroup, group), self._device.type)
        self._world = torch.distributed.get_world_size()
        self._rank = torch.distributed.get_rank()
        # id(local view) -> (local view, flat view of the full live tensor): what `after_write` must refill.
        self._full_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shapes: dict[str, torch.Size] = {}

    def select(self, model: nn.Module, config: EMAConfig) -> Selection:
        selection = super().select(model, config)
        # Every rank must shard the same tensors in the same order, or the gathers would mix tensors up.
        mine = [(n, t.numel()) for n, t in selection.averaged + selection.copied]
        for rank, theirs in enumerate(all_gather_object(mine)):
            if theirs != mine:
                raise ConfigError(
                    f"`shard_across_ranks` needs the same model on every rank, but rank {rank} tracks "
                    f"{len(theirs)} tensors and rank {self._rank} tracks {len(mine)} (or their sizes differ); "
                    f"pass shard_across_ranks=False if the ranks train different models"
                )
        return selection

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_contiguous():
            raise ConfigError(
                f"`shard_across_ranks` needs contiguous tensors, but {name!r} has strides {tensor.stride()}; "
                f"pass shard_across_ranks=False"
            )
        flat = tensor.detach().view(-1)
        start, end = chunk_bounds(flat.numel(), self._rank, self._world)
        view = flat[start:end]
        self._full_of[id(view)] = (view, flat)
        self._shapes[name] = tensor.shape
        return view

    def _gather(self, local: torch.Tensor, numel: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        dt = DTensor.from_local(
            local.to(self._device), self._mesh, [Shard(0)], run_check=False, shape=torch.Size((numel,)), stride=(1,)
        )
        return dt.full_tensor()

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        shape = self._shapes[name]
        full = self._gather(local_ema, math.prod(shape)).view(shape)
        return full if (all_ranks or self.is_main_process()) else None

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        flat = full.reshape(-1)
        start, end = chunk_bounds(flat.numel(), self._rank, self._world)
        return flat[start:end].clone()

    def ema_piece(self, name: str, local: torch.Tensor) -> FlatPiece:
        shape = tuple(self._shapes[name])
        start, end = chunk_bounds(math.prod(shape), self._rank, self._world)
        return FlatPiece(shape, start, end - start, True)

    def model_piece(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, FlatPiece]:
        if not tensor.is_contiguous():
            return super().model_piece(name, tensor)
        # The model is replicated: each rank writes the same chunk of the model's other tensors as of the EMA's.
        start, end = chunk_bounds(tensor.numel(), self._rank, self._world)
        return tensor.detach().view(-1)[start:end], FlatPiece(tuple(tensor.shape), start, end - start, True)

    @torch.no_grad()
    def after_write(self, locals_: list[torch.Tensor]) -> None:
        # Each rank wrote its own chunk; rebuild the whole tensor on every rank, one tensor at a time.
        for view in locals_:
            _, flat = self._full_of[id(view)]
            flat.copy_(self._gather(view, flat.numel()))

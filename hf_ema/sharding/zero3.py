"""Layout of a DeepSpeed ZeRO-3 model: the EMA follows each parameter's local partition (`param.ds_tensor`).

Written against DeepSpeed's partitioning (`deepspeed/runtime/zero/partition_parameters.py`): a parameter of
`ds_numel` elements is flattened, padded to a multiple of the data-parallel group size, and rank `r` of
`param.ds_process_group` holds elements `[r * P, (r + 1) * P)` in `param.ds_tensor` (`P = ds_tensor.numel()`).
The EMA averages `ds_tensor` in place, with no gather during training. At save time each EMA partition is gathered
exactly as DeepSpeed gathers a parameter (`all_gather_into_tensor` / `gather` over `ds_process_group`), on the EMA
buffer itself, so the fp32 EMA is saved exactly (`deepspeed.zero.GatheredParameters` would gather the model's own,
often bf16, weights instead). DeepSpeed is not imported here: the layout reads those attributes through
`hf_ema.compat.deepspeed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compat.deepspeed import full_tensor_is_gathered, is_zero3_param, partition_of, partition_on_nvme
from ..errors import ConfigError
from .base import FlatPiece, ShardedLayoutBase
from .collectives import gather_concat

__all__ = ["ZeRO3Layout", "is_zero3"]


def is_zero3(model: nn.Module) -> bool:
    """Whether `model` holds DeepSpeed ZeRO-3 partitioned parameters (DeepSpeed's own test: a `ds_id` attribute).

    Args:
        model (`nn.Module`): The model.
    """
    return any(is_zero3_param(p) for p in model.parameters())


@dataclass(frozen=True)
class _Partition:
    param: Any
    group: Any
    numel: int
    shape: torch.Size


def _partition_piece(group: Any, numel: int, shape: torch.Size, size: int) -> FlatPiece:
    # Rank r of the group holds elements [r * size, (r + 1) * size) of the flattened parameter, padding after the end.
    start = min(torch.distributed.get_rank(group) * size, numel)
    return FlatPiece(tuple(shape), start, min(size, numel - start), True)


class ZeRO3Layout(ShardedLayoutBase):
    """DeepSpeed ZeRO-3: the EMA holds an fp32 copy of each parameter's partition (`ds_tensor`), padding included.

    Args:
        model (`nn.Module`): The model (unused; the layout reads each parameter's `ds_*` attributes).
    """

    kind = "zero3"

    def __init__(self, model: nn.Module | None = None) -> None:
        self._parts: dict[str, _Partition] = {}
        self._param_of_view: dict[int, tuple[torch.Tensor, _Partition]] = {}

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not is_zero3_param(tensor):  # a buffer, or a parameter DeepSpeed does not partition
            self._parts.pop(name, None)
            return tensor.detach()
        if partition_on_nvme(tensor):
            raise ConfigError(
                f"an EMA cannot follow ZeRO-3 parameters offloaded to NVMe (their partition is swapped out between "
                f"steps), got offload_param.device='nvme' for {name!r}; use 'cpu' or 'none'"
            )
        info = partition_of(tensor)
        part = _Partition(tensor, info.group, info.numel, info.shape)
        self._parts[name] = part
        view = info.local.detach()
        self._param_of_view[id(view)] = (view, part)
        return view

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        part = self._parts.get(name)
        if part is None:
            return local_ema if (all_ranks or self.is_main_process()) else None
        return self._gather(part, local_ema, all_ranks)

    def _gather(self, part: _Partition, local: torch.Tensor, all_ranks: bool) -> torch.Tensor | None:
        flat = gather_concat(local, part.group, all_ranks)
        if flat is None or not (all_ranks or self.is_main_process()):
            return None
        return flat[: part.numel].view(part.shape)

    def ema_piece(self, name: str, local: torch.Tensor) -> FlatPiece:
        part = self._parts.get(name)
        if part is None:
            return super().ema_piece(name, local)
        return _partition_piece(part.group, part.numel, part.shape, local.numel())

    def model_piece(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, FlatPiece]:
        if not is_zero3_param(tensor):
            return super().model_piece(name, tensor)
        info = partition_of(tensor)
        return info.local.detach(), _partition_piece(info.group, info.numel, info.shape, info.local.numel())

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        part = self._parts.get(name)
        if part is None:
            return full
        size = local_like.numel()
        start = torch.distributed.get_rank(part.group) * size
        flat = full.reshape(-1)
        out = torch.zeros(size, dtype=full.dtype)
        piece = flat[start : min(start + size, flat.numel())]
        out[: piece.numel()].copy_(piece)
        return out

    @torch.no_grad()
    def after_write(self, locals_: list[torch.Tensor]) -> None:
        # A forward reads a parameter's full tensor when it is already gathered, without re-gathering it from the
        # partition: parameters below `stage3_param_persistence_threshold` keep it between steps, and DeepSpeed
        # leaves others gathered after an evaluation forward (with `offload_param`, and under `torch.no_grad`).
        # Refresh every gathered full tensor from the partitions that were just written, or an evaluation inside
        # `swapped()` would see the raw weights. Every rank sees the same statuses, so the gathers stay collective.
        for view in locals_:
            entry = self._param_of_view.get(id(view))
            if entry is None:
                continue
            _, part = entry
            if full_tensor_is_gathered(part.param):
                full = self._gather(part, view, all_ranks=True)
                if full is not None:  # always, with all_ranks=True
                    part.param.data.copy_(full.to(part.param.device))

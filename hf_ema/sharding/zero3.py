"""Layout of a DeepSpeed ZeRO-3 model: the EMA follows each parameter's local partition (`param.ds_tensor`).

Written against DeepSpeed's partitioning (`deepspeed/runtime/zero/partition_parameters.py`): a parameter of
`ds_numel` elements is flattened, padded to a multiple of the data-parallel group size, and rank `r` of
`param.ds_process_group` holds elements `[r * P, (r + 1) * P)` in `param.ds_tensor` (`P = ds_tensor.numel()`).
The EMA averages `ds_tensor` in place, with no gather during training. At save time each EMA partition is gathered
exactly as DeepSpeed gathers a parameter (`all_gather_into_tensor` / `gather` over `ds_process_group`), on the EMA
buffer itself, so the fp32 EMA is saved exactly (`deepspeed.zero.GatheredParameters` would gather the model's own,
often bf16, weights instead). DeepSpeed is not imported here: the layout only reads those attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import ShardedLayoutBase, comm_device

__all__ = ["ZeRO3Layout", "is_zero3"]


def is_zero3(model: nn.Module) -> bool:
    """Whether `model` holds DeepSpeed ZeRO-3 partitioned parameters (DeepSpeed's own test: a `ds_id` attribute).

    Args:
        model (`nn.Module`): The model.
    """
    return any(hasattr(p, "ds_id") and getattr(p, "ds_tensor", None) is not None for p in model.parameters())


@dataclass(frozen=True)
class _Partition:
    param: Any
    group: Any
    numel: int
    shape: torch.Size


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
        ds_tensor = getattr(tensor, "ds_tensor", None)
        if ds_tensor is None:  # a buffer, or a parameter DeepSpeed does not partition
            self._parts.pop(name, None)
            return tensor.detach()
        if "nvme" in str(getattr(ds_tensor, "final_location", None)).lower():
            raise ConfigError(
                f"an EMA cannot follow ZeRO-3 parameters offloaded to NVMe (their partition is swapped out between "
                f"steps), got offload_param.device='nvme' for {name!r}; use 'cpu' or 'none'"
            )
        part = _Partition(tensor, tensor.ds_process_group, int(tensor.ds_numel), torch.Size(tensor.ds_shape))
        self._parts[name] = part
        view = ds_tensor.detach()
        self._param_of_view[id(view)] = (view, part)
        return view

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        part = self._parts.get(name)
        if part is None:
            return local_ema if (all_ranks or self.is_main_process()) else None
        return self._gather(part, local_ema, all_ranks)

    def _gather(self, part: _Partition, local: torch.Tensor, all_ranks: bool) -> torch.Tensor | None:
        group = part.group
        world = torch.distributed.get_world_size(group)
        device = comm_device(group)
        local = local.reshape(-1).to(device)
        if all_ranks:
            flat = torch.empty(world * local.numel(), dtype=local.dtype, device=device)
            torch.distributed.all_gather_into_tensor(flat, local, group=group)
            return flat[: part.numel].view(part.shape)
        dst = torch.distributed.get_global_rank(group, 0)
        parts = [torch.empty_like(local) for _ in range(world)] if torch.distributed.get_rank() == dst else None
        torch.distributed.gather(local, parts, dst=dst, group=group)
        if parts is None or not self.is_main_process():
            return None
        return torch.cat(parts)[: part.numel].view(part.shape)

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
        # Parameters below `stage3_param_persistence_threshold` keep their full tensor between steps and DeepSpeed
        # does not re-gather it from the partition: refresh it from the partitions that were just written.
        for view in locals_:
            entry = self._param_of_view.get(id(view))
            if entry is None:
                continue
            _, part = entry
            status = getattr(getattr(part.param, "ds_status", None), "name", None)
            if getattr(part.param, "ds_persist", False) and status == "AVAILABLE":
                full = self._gather(part, view, all_ranks=True)
                part.param.data.copy_(full.to(part.param.device))

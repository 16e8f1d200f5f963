"""The tensors of an EMA: `EMATensor` (one tensor with its name, the model-side tensor it follows and its kind, as
`ModelEMA.named_tensors()` yields them), how an EMA tensor is allocated, and the groups updated together."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .config import EMAConfig

__all__ = ["EMATensor", "TensorGroup", "TensorKind", "group_tensors", "new_ema_tensor"]


class TensorKind(enum.Enum):
    """What the EMA does with a tensor of the model."""

    #: Floating-point weights (and buffers, with `include_buffers`): `ema = beta * ema + (1 - beta) * weights`.
    AVERAGED = "averaged"
    #: Tensors that cannot be averaged (integer buffers such as a batch norm's `num_batches_tracked`): copied from
    #: the model at each update.
    COPIED = "copied"


class EMATensor(NamedTuple):
    """One tensor of a [`ModelEMA`], as [`ModelEMA.named_tensors`] yields it.

    Args:
        name (`str`): The name `save_pretrained` writes it under (the model's `state_dict` name).
        ema (`torch.Tensor`): This rank's EMA tensor (the EMA dtype for an averaged tensor).
        live (`torch.Tensor`): This rank's part of the model's tensor that the EMA follows (a view sharing storage
            with the model).
        kind (`TensorKind`): Averaged or copied.
    """

    name: str
    ema: torch.Tensor
    live: torch.Tensor
    kind: TensorKind

    @property
    def averaged(self) -> bool:
        """Whether the EMA averages this tensor (else it copies it)."""
        return self.kind is TensorKind.AVERAGED


def new_ema_tensor(live: torch.Tensor, config: EMAConfig) -> torch.Tensor:
    """A new EMA tensor holding `live`'s values, in the config's dtype, on its device (or `live`'s).

    Args:
        live (`torch.Tensor`): The weights it averages.
        config (`EMAConfig`): The EMA's config (`dtype`, `device`).
    """
    device = torch.device(config.device) if config.device is not None else live.device
    # An EMA offloaded from CUDA lives in pinned memory: fast, non_blocking copies when it is swapped in.
    pin = device.type == "cpu" and live.is_cuda
    out = torch.empty(live.shape, dtype=config.torch_dtype, device=device, pin_memory=pin)
    out.copy_(live.detach())
    return out


@dataclass
class TensorGroup:
    """Tensors updated together by one multi-tensor call (same devices and dtypes), and their indices among all.

    Args:
        ema (`list[torch.Tensor]`): The EMA tensors.
        live (`list[torch.Tensor]`): The weights they average.
        indices (`list[int]`): Their positions among the EMA's averaged tensors.
    """

    ema: list[torch.Tensor] = field(default_factory=list)
    live: list[torch.Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


def group_tensors(ema: list[torch.Tensor], live: list[torch.Tensor]) -> list[TensorGroup]:
    """The groups of `(ema, live)` pairs that share the EMA's and the weights' device and dtype, in first-seen order.

    Args:
        ema (`list[torch.Tensor]`): The EMA tensors.
        live (`list[torch.Tensor]`): The weights, same order.
    """
    groups: dict[tuple, TensorGroup] = {}
    for i, (e, w) in enumerate(zip(ema, live)):
        group = groups.setdefault((e.device, e.dtype, w.device, w.dtype), TensorGroup())
        group.ema.append(e)
        group.live.append(w)
        group.indices.append(i)
    return list(groups.values())

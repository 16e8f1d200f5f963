"""`EMATensor`: one tensor of an EMA with its name, the model-side tensor it follows and its kind, as
`ModelEMA.named_tensors()` yields them."""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

__all__ = ["EMATensor", "TensorKind"]


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

"""The fused multi-tensor update passes. One call per (device, dtype) group, never a Python loop of small ops."""

from __future__ import annotations

import torch

__all__ = ["copy_", "lerp_"]


def lerp_(ema: list[torch.Tensor], live: list[torch.Tensor], weight: float) -> None:
    """`ema += weight * (live - ema)` in place, for every pair, in one multi-tensor pass.

    `ema` and `live` are lists of tensors on one device; `live` may have a lower precision than `ema` (bf16 weights,
    fp32 EMA), in which case no full-precision copy of `live` is materialised.

    Args:
        ema (`list[torch.Tensor]`): The EMA tensors, updated in place.
        live (`list[torch.Tensor]`): The current weights, same shapes.
        weight (`float`): `1 - beta`.
    """
    if not ema:
        return
    if ema[0].dtype == live[0].dtype:
        torch._foreach_lerp_(ema, live, weight)
    else:
        # `_foreach_lerp_` needs equal dtypes; multiply-add reads the low-precision weights and upcasts on the fly.
        torch._foreach_mul_(ema, 1.0 - weight)
        torch._foreach_add_(ema, live, alpha=weight)


def copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """`dst[i].copy_(src[i])` for every pair in one multi-tensor pass (dtype conversion included).

    Args:
        dst (`list[torch.Tensor]`): Destination tensors.
        src (`list[torch.Tensor]`): Source tensors, same shapes.
    """
    if dst:
        torch._foreach_copy_(dst, src)

"""What the ranks of a sharded EMA must agree on at each update, as callables for the update engine.

Each rank of a sharded EMA (FSDP, ZeRO-3, the DDP-sharded EMA) reads only its own shards, so every decision that
depends on what a rank sees must be made alike everywhere, or the shards would hold averages of different steps:

- `skip`: whether the weights were finite on every rank (the non-finite check of the eager kernels, read on the
  host; from the background thread of an offloaded EMA it runs over a CPU process group of its own, so that it
  never interleaves with the training's collectives);
- `device_skip`: the same for the GPU update, whose flags stay on the device (a MAX all-reduce queued on the stream);
- `any_busy`: whether any rank's background fold is still busy (then every rank coalesces the update).

A replicated EMA reads the same weights on every rank and needs none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import ShardLayout
from .collectives import all_ranks_agree, comm_device, new_cpu_group, reduce_max_

__all__ = ["Agreements", "agreements_for"]


@dataclass(frozen=True)
class Agreements:
    """The agreements of one EMA (each `None` where it needs none).

    Args:
        skip (`Callable[[bool], bool]`, *optional*): `skip(local_ok)`: whether every rank's weights were finite.
        device_skip (`Callable[[torch.Tensor], torch.Tensor]`, *optional*): In-place MAX of the device flags.
        any_busy (`Callable[[bool], bool]`, *optional*): `any_busy(local_busy)`: whether any rank's fold is busy.
    """

    skip: Callable[[bool], bool] | None = None
    device_skip: Callable[[torch.Tensor], torch.Tensor] | None = None
    any_busy: Callable[[bool], bool] | None = None


def agreements_for(layout: ShardLayout, check: bool, in_background: bool, on_device: bool) -> Agreements:
    """The agreements an EMA needs (a collective call when it creates process groups: every rank makes it, when it
    builds its EMA).

    Args:
        layout (`ShardLayout`): The EMA's layout.
        check (`bool`): Whether updates check the weights for NaN/inf (`on_nonfinite != "ignore"`).
        in_background (`bool`): Whether updates are folded in a background thread (an offloaded EMA).
        on_device (`bool`): Whether the skip is decided on the device (the GPU update).
    """
    if not layout.is_sharded or layout.world_size <= 1:
        return Agreements()
    skip = device_skip = any_busy = None
    if check and on_device:
        device_skip = reduce_max_
    elif check:
        group, device = (new_cpu_group(), torch.device("cpu")) if in_background else (None, comm_device())
        skip = functools.partial(all_ranks_agree, group=group, device=device)
    if in_background:
        busy_group = new_cpu_group()

        def any_busy(busy: bool) -> bool:
            return not all_ranks_agree(not busy, group=busy_group, device=torch.device("cpu"))

    return Agreements(skip, device_skip, any_busy)

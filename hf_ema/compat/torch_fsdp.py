"""The private torch FSDP APIs hf-ema relies on (FSDP2 lazy init and DTensor shard geometry; FSDP1 flat-parameter
layout, lazy init and reshard), each in one place behind a version guard.

An EMA that follows each rank's own shard must know where a parameter's elements sit in FSDP1's flat parameter and
must run FSDP's lazy initialisation before it takes views of the shards: neither has a public API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._guard import missing_api, require_version
from .torch import MIN_TORCH

__all__ = [
    "FlatParamInfo",
    "fsdp1_flat_params",
    "fsdp1_lazy_init",
    "fsdp1_local_view",
    "fsdp1_reshard",
    "fsdp2_lazy_init",
    "is_fsdp_flattened",
    "local_shape_and_offset",
]

require_version("torch", MIN_TORCH, "hf-ema's FSDP support")


def fsdp2_lazy_init(module: nn.Module) -> None:
    """Run FSDP2's lazy initialisation (normally at the first forward) on a `fully_shard`ed module.

    It re-pads the local shard of unevenly sharded parameters whose storage was replaced (e.g. by
    `load_state_dict(assign=True)` in accelerate's RAM-efficient loading), so the views the EMA takes are final.

    Args:
        module (`FSDPModule`): A `fully_shard`ed module.
    """
    state = getattr(module, "_get_fsdp_state", None)
    if state is None:
        return
    lazy_init = getattr(state(), "_lazy_init", None)
    if lazy_init is None:
        raise missing_api("torch", "FSDPState._lazy_init", "an EMA of an FSDP2 model")
    lazy_init()


def local_shape_and_offset(shape: torch.Size, mesh: Any, placements: Sequence[Any]) -> tuple[tuple, tuple]:
    """The shape and global offset of this rank's local shard of a DTensor of `shape`.

    Args:
        shape (`torch.Size`): The global shape.
        mesh (`DeviceMesh`): The device mesh.
        placements (`Sequence[Placement]`): The placements.
    """
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as exc:  # pragma: no cover - depends on torch
        raise missing_api("torch", "distributed.tensor._utils.compute_local_shape_and_global_offset", "FSDP2") from exc
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local_shape), tuple(offset)


def fsdp1_lazy_init(root: nn.Module) -> None:
    """What FSDP1 runs before the first forward (and in `clip_grad_norm_`, `summon_full_params`): it fixes each flat
    parameter's local shard, the storage the EMA must follow (pinned anew under CPU offload).

    Args:
        root (`FullyShardedDataParallel`): A root FSDP1 module.
    """
    try:
        from torch.distributed.fsdp._runtime_utils import _lazy_init
    except ImportError as exc:  # pragma: no cover - depends on torch
        raise missing_api("torch", "distributed.fsdp._runtime_utils._lazy_init", "an EMA of an FSDP1 model") from exc
    _lazy_init(root, root)


@dataclass(frozen=True)
class FlatParamInfo:
    """The layout of one FSDP1 flat parameter, read from its private fields.

    Args:
        module (`nn.Module`): The FSDP1 module owning it.
        handle (`Any`): Its `FlatParamHandle`.
        flat_param (`Any`): The flat parameter.
        process_group (`Any`): The group it is sharded over.
        use_orig_params (`bool`): Built with `use_orig_params=True`.
        strategy (`str`): The sharding strategy's name (`FULL_SHARD`, `NO_SHARD`, ...).
        params (`list[nn.Parameter]`): The original parameters, in flat order.
        starts (`list[int]`): Offset of each parameter in the unsharded (padded) flat parameter.
        numels (`list[int]`): Elements of each parameter.
        shapes (`list[torch.Size]`): Shape of each parameter.
        shard_numel (`int`): Elements of each rank's padded shard.
    """

    module: nn.Module
    handle: Any
    flat_param: Any
    process_group: Any
    use_orig_params: bool
    strategy: str
    params: list
    starts: list
    numels: list
    shapes: list
    shard_numel: int


def fsdp1_flat_params(fsdp_cls: type, model: nn.Module) -> list[FlatParamInfo]:
    """The flat parameters of every FSDP1 unit in `model`.

    Args:
        fsdp_cls (`type`): `FullyShardedDataParallel`.
        model (`nn.Module`): The FSDP1-wrapped model.
    """
    out = []
    for module in getattr(fsdp_cls, "fsdp_modules")(model):  # noqa: B009 - `fsdp_cls` is typed as a plain `type`
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        try:
            starts: list[int] = []
            offset = 0
            for numel, is_padding in zip(flat._numels_with_padding, flat._is_padding_mask):
                if not is_padding:
                    starts.append(offset)
                offset += numel
            out.append(
                FlatParamInfo(
                    module=module,
                    handle=handle,
                    flat_param=flat,
                    process_group=handle.process_group,
                    use_orig_params=bool(handle._use_orig_params),
                    strategy=handle._sharding_strategy.name,
                    params=list(flat._params or ()),  # None without use_orig_params (refused by the layout)
                    starts=starts,
                    numels=list(flat._numels),
                    shapes=list(flat._shapes),
                    shard_numel=flat._sharded_size.numel(),
                )
            )
        except AttributeError as exc:
            raise missing_api("torch", f"FlatParameter.{exc.name}", "an EMA of an FSDP1 model") from exc
    return out


def fsdp1_local_view(flat_param: Any, index: int) -> torch.Tensor:
    """This rank's elements of the `index`-th original parameter, as a view of the flat parameter's local shard.

    Args:
        flat_param (`FlatParameter`): The flat parameter.
        index (`int`): The parameter's index in it.
    """
    info = flat_param._shard_param_infos[index]
    shard = flat_param._local_shard
    if not info.in_shard:
        return shard[:0]
    return shard[info.offset_in_shard : info.offset_in_shard + info.numel_in_shard]


def fsdp1_reshard(module: nn.Module, handle: Any) -> None:
    """Free the unsharded flat parameter of `handle` if it is gathered, as `summon_full_params` does on exit.

    Args:
        module (`FullyShardedDataParallel`): The module.
        handle (`FlatParamHandle`): Its handle.
    """
    from torch.distributed.fsdp._runtime_utils import _reshard

    if not handle.needs_unshard():
        _reshard(module, handle, True)


def is_fsdp_flattened(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an original parameter that FSDP1 flattened into a flat parameter."""
    return bool(getattr(tensor, "_fsdp_flattened", False))

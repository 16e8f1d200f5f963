"""The DeepSpeed ZeRO-3 parameter attributes hf-ema reads, each in one place behind a version guard.

DeepSpeed is never imported: a ZeRO-3 partitioned parameter carries its partitioning as attributes
(`deepspeed/runtime/zero/partition_parameters.py`), and these helpers only read them.

- `ds_id`, `ds_tensor`: the parameter is partitioned; `ds_tensor` is this rank's flat partition.
- `ds_process_group`, `ds_numel`, `ds_shape`: the group it is partitioned over and the full size and shape.
- `ds_tensor.final_location`: where the partition lives between steps. `OffloadDeviceEnum.nvme` (a `str` enum equal
  to `"nvme"`) when it is swapped out to NVMe; ZeRO-3's optimizer marks partitions it moved into its CPU or GPU
  flat buffers with the plain string `"not-nvme"` (`stage3.py`), so only equality with `"nvme"` means NVMe.
- `ds_status` (`ZeroParamStatus`): `AVAILABLE` while the full tensor is gathered into `param.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._guard import UpstreamChangedError, require_version, version_of

__all__ = [
    "MIN_DEEPSPEED",
    "Zero3Partition",
    "full_tensor_is_gathered",
    "is_zero3_param",
    "partition_of",
    "partition_on_nvme",
]

#: The oldest DeepSpeed whose ZeRO-3 parameters carry every attribute read here (`ds_status`, `ds_persist`,
#: `ds_tensor.final_location`, `ds_process_group`); tested with 0.19.
MIN_DEEPSPEED = "0.14"

_ATTRIBUTES = ("ds_tensor", "ds_process_group", "ds_numel", "ds_shape", "ds_status")


@dataclass(frozen=True)
class Zero3Partition:
    """One ZeRO-3 parameter's partitioning.

    Args:
        local (`torch.Tensor`): This rank's flat partition (`ds_tensor`), padding included.
        group (`ProcessGroup`): The group the parameter is partitioned over.
        numel (`int`): Elements of the full parameter.
        shape (`torch.Size`): Shape of the full parameter.
    """

    local: torch.Tensor
    group: Any
    numel: int
    shape: torch.Size


def is_zero3_param(param: Any) -> bool:
    """Whether `param` is partitioned by ZeRO-3 (DeepSpeed's own test: a `ds_id` attribute, here with a partition).

    Args:
        param (`torch.Tensor`): A parameter.
    """
    return hasattr(param, "ds_id") and getattr(param, "ds_tensor", None) is not None


def _check(param: Any) -> None:
    if version_of("deepspeed") is not None:
        require_version("deepspeed", MIN_DEEPSPEED, "an EMA of a ZeRO-3 model")
    missing = [a for a in _ATTRIBUTES if not hasattr(param, a)]
    if missing:
        raise UpstreamChangedError(
            f"an EMA of a ZeRO-3 model relies on DeepSpeed's parameter attributes {missing}, which DeepSpeed "
            f"{version_of('deepspeed')} does not set; please report this at the hf-ema issue tracker and pin an "
            f"earlier deepspeed"
        )


def partition_of(param: Any) -> Zero3Partition:
    """This rank's partition of a ZeRO-3 parameter (see [`is_zero3_param`]).

    Args:
        param (`torch.Tensor`): A ZeRO-3 parameter.

    Raises:
        `UpstreamChangedError`: DeepSpeed is older than `MIN_DEEPSPEED` or no longer sets these attributes.
    """
    _check(param)
    return Zero3Partition(
        local=param.ds_tensor,
        group=param.ds_process_group,
        numel=int(param.ds_numel),
        shape=torch.Size(param.ds_shape),
    )


def partition_on_nvme(param: Any) -> bool:
    """Whether the partition of a ZeRO-3 parameter is offloaded to NVMe (`offload_param.device="nvme"`), i.e.
    swapped out of memory between steps.

    Args:
        param (`torch.Tensor`): A ZeRO-3 parameter.
    """
    location = getattr(param.ds_tensor, "final_location", None)
    # `OffloadDeviceEnum.nvme` is a `str` enum equal to "nvme"; "not-nvme" (CPU or GPU flat buffer) is not NVMe.
    return location is not None and location == "nvme"


def full_tensor_is_gathered(param: Any) -> bool:
    """Whether a ZeRO-3 parameter currently holds its full tensor in `param.data` (`ds_status == AVAILABLE`): the
    partition is then not what a forward reads.

    DeepSpeed keeps the full tensor between steps for parameters under `stage3_param_persistence_threshold`
    (`ds_persist`) and, in evaluation, for parameters it did not release after a forward (seen with
    `offload_param` and with plain ZeRO-3 under `torch.no_grad`).

    Args:
        param (`torch.Tensor`): A ZeRO-3 parameter.
    """
    status = getattr(getattr(param, "ds_status", None), "name", None)
    return status == "AVAILABLE" and param.data.numel() == int(param.ds_numel)

"""The private or unstable torch APIs hf-ema relies on, each in one place behind a version guard.

- The `torch._foreach_*` multi-tensor ops: one kernel launch for a whole group of tensors.
- `torch._dynamo` / inductor / triton probes: whether `torch.compile` can build a kernel here.
- `module._orig_mod` of a `torch.compile`d model, and `module._buffers` / `_non_persistent_buffers_set` (the
  persistent buffers without calling `state_dict()`, a collective under FSDP1).
- FSDP1 flat-parameter internals are in [`hf_ema.compat.torch_fsdp`].
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from ._guard import missing_api, require_version

__all__ = [
    "MIN_TORCH",
    "all_gather_flat",
    "compile_supported",
    "current_accelerator_device",
    "foreach_copy_",
    "foreach_lerp_",
    "foreach_norm",
    "foreach_sub",
    "persistent_buffers",
    "unwrap_compiled",
]

#: The oldest torch hf-ema supports: `torch.accelerator` (device-agnostic current device) and FSDP2 `fully_shard`
#: in `torch.distributed.fsdp`.
MIN_TORCH = "2.6"

require_version("torch", MIN_TORCH, "hf-ema")
for _op in ("_foreach_lerp_", "_foreach_copy_", "_foreach_sub", "_foreach_norm"):
    if not hasattr(torch, _op):
        raise missing_api("torch", f"torch.{_op}", "hf-ema's EMA update")


def current_accelerator_device(device_type: str | None = None) -> torch.device | None:
    """The current device of this process's accelerator (CUDA, XPU, HPU, ...), through `torch.accelerator` (2.6+),
    or `None` when there is no accelerator.

    Args:
        device_type (`str`, *optional*): The accelerator type the caller expects (e.g. a device mesh's
            `device_type`); its current index is returned even when `torch.accelerator` reports another type.
    """
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not hasattr(accelerator, "current_device_index"):
        raise missing_api("torch", "torch.accelerator", "an EMA of a model sharded over accelerators")
    found = accelerator.current_accelerator()
    if found is None and device_type is None:
        return None
    return torch.device(device_type or found.type, accelerator.current_device_index())


def foreach_lerp_(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """`ema[i] += weight * (live[i] - ema[i])` for every pair, in one multi-tensor kernel."""
    # `cast`, not `list()`: this runs at every update; the ops take any sequence at run time.
    torch._foreach_lerp_(cast(list, ema), cast(list, live), weight)  # type: ignore[arg-type]  # float or tensor


def foreach_copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """`dst[i].copy_(src[i])` for every pair, in one multi-tensor kernel."""
    torch._foreach_copy_(cast(list, dst), cast(list, src))


def foreach_sub(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`[a[i] - b[i]]`, in one multi-tensor kernel."""
    return list(torch._foreach_sub(cast(list, a), cast(list, b)))


def foreach_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The 2-norm of each tensor, in one multi-tensor kernel (accumulated and returned in `dtype` when given)."""
    if dtype is None:
        return list(torch._foreach_norm(cast(list, tensors)))
    return list(torch._foreach_norm(cast(list, tensors), 2, dtype=dtype))


def all_gather_flat(output: torch.Tensor, local: torch.Tensor, group=None) -> None:
    """Gather every rank's `local` into `output` (rank order, `world * local.numel()` elements): torch 2.13 renamed
    `all_gather_into_tensor` to `all_gather_single` and deprecates the old name; older torch has only the old one.

    Args:
        output (`torch.Tensor`): The flat result.
        local (`torch.Tensor`): This rank's flat piece.
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).
    """
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(output, local, group=group)


def compile_supported(device: torch.device | str) -> bool:
    """Whether `torch.compile` can build a kernel for `device` here (a C++ compiler for CPU, triton for CUDA).

    Args:
        device (`torch.device` or `str`): Where the kernel would run.
    """
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        device_type = torch.device(device).type
        if device_type == "cpu":
            from torch._inductor import config as inductor_config

            compiler = os.environ.get("CXX") or getattr(inductor_config.cpp, "cxx", (None, "g++"))[-1] or "g++"
            return shutil.which(compiler) is not None or shutil.which("g++") is not None
        if device_type == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
    except Exception:  # any import or probing failure means: no compiler
        return False
    return False


def unwrap_compiled(model: nn.Module) -> nn.Module | None:
    """The original module of a `torch.compile`d model (`OptimizedModule._orig_mod`), or `None` for another module.

    Args:
        model (`nn.Module`): The module.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's persistent buffers by name, found without calling `state_dict()` (a collective under FSDP1).

    Args:
        model (`nn.Module`): The model.
    """
    out = []
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is None or name in module._non_persistent_buffers_set:
                continue
            out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out

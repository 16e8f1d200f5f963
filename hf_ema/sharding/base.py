"""How each averaged tensor maps to the shard this rank holds, and how to rebuild the full tensor at save time.

`ModelEMA` never touches a full tensor of a sharded model during training: it averages `layout.local(...)` and
asks the layout for the full tensor only when it writes a checkpoint (or, for the DDP-sharded EMA, when it swaps
the EMA into the model). The layouts of sharded models live in their own modules: `sharding_ddp` (the EMA sharded
across data-parallel ranks), `sharding_fsdp` (FSDP2 and FSDP1) and `sharding_zero` (DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..compat.torch import persistent_buffers

if TYPE_CHECKING:
    from ..config import EMAConfig
    from ..selection import Selection

__all__ = [
    "ReplicatedLayout",
    "ShardLayout",
    "ShardedLayoutBase",
    "comm_device",
    "dist_ready",
    "persistent_buffers",
    "strip_wrapper_prefixes",
]


def dist_ready() -> bool:
    """Whether `torch.distributed` is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_main_process() -> bool:
    if dist_ready():
        return torch.distributed.get_rank() == 0
    return True


def comm_device(group: torch.distributed.ProcessGroup | None = None) -> torch.device:
    """The device collectives of `group` run on: the current accelerator for NCCL-like backends, else CPU.

    EMA shards offloaded to CPU (`device="cpu"`) are moved there for the duration of one collective.

    Args:
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).
    """
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend) or "hccl" in str(backend) or "xccl" in str(backend):
        acc = torch.accelerator.current_accelerator()
        if acc is not None:
            return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


class ShardLayout:
    """Base class: maps between the model's live tensors, the local shards the EMA holds and full tensors.

    Subclasses handle one way of sharding a model. The base class is the unsharded case.
    """

    #: Short name shown in logs and saved in the EMA state.
    kind: str = "replicated"
    #: Whether the EMA on each rank holds only part of each tensor (per-rank shard files are written at save).
    is_sharded: bool = False

    def select(self, model: nn.Module, config: EMAConfig) -> Selection:
        """The tensors to average and copy, under the names `save_pretrained` writes.

        Args:
            model (`nn.Module`): The unwrapped model.
            config (`EMAConfig`): The EMA configuration.
        """
        from ..selection import select_tensors

        return select_tensors(model, config)

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor the EMA reads after each step and writes when it swaps in: this rank's shard, as a view
        sharing storage with the model.

        Args:
            name (`str`): The tensor's name in the model.
            tensor (`torch.Tensor`): The live parameter or buffer.
        """
        return tensor.detach()

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        """The full (unsharded) tensor for `local_ema`; a collective call that every rank makes in the same order.

        Returns the tensor on the main process and `None` elsewhere (on every rank with `all_ranks=True`).

        Args:
            name (`str`): The tensor's name.
            local_ema (`torch.Tensor`): This rank's EMA shard.
            all_ranks (`bool`, *optional*, defaults to `False`): Return the full tensor on every rank.
        """
        return local_ema if (all_ranks or self.is_main_process()) else None

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor (used to re-shard a saved full EMA on resume). Never a collective,
        so each rank may decide on its own to re-shard.

        Args:
            name (`str`): The tensor's name.
            full (`torch.Tensor`): The full tensor.
            local_like (`torch.Tensor`): This rank's current shard, for shape and dtype.
        """
        return full

    def after_write(self, locals_: list[torch.Tensor]) -> None:
        """Called after the EMA (or the raw weights) were written into the model's local shards, by `copy_to`
        and on entering and leaving `swapped()`. A collective for layouts whose model is replicated but whose EMA
        is sharded (each rank then wrote only its slice, which all ranks must exchange).

        Args:
            locals_ (`list[torch.Tensor]`): The local views written, as returned by `local()`.
        """

    def full_model_tensors(self, model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor] | None:
        """The full tensors of the model's `state_dict` entries that the EMA does not hold, for `save_pretrained`.

        A collective for sharded layouts. Returns `None` on ranks other than the main process.

        Args:
            model (`nn.Module`): The unwrapped model.
            skip (`set[str]`): Names the EMA already provides.
        """
        if not self.is_main_process():
            return None
        return {k: v for k, v in model.state_dict().items() if k not in skip}

    def save_module(self, model: nn.Module) -> nn.Module:
        """The module whose `save_pretrained` / config writes the `ema/` folder (FSDP1 unwraps its root).

        Args:
            model (`nn.Module`): The unwrapped model.
        """
        return model

    def save_pretrained(
        self, module: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor]
    ) -> None:
        """Write `state_dict` (full tensors, `state_dict` names) with `module.save_pretrained`, on the main process.

        Args:
            module (`nn.Module`): The module returned by `save_module()`.
            folder (`str` or `os.PathLike`): Where to write.
            state_dict (`dict[str, torch.Tensor]`): The tensors to write.
        """
        module.save_pretrained(folder, state_dict=state_dict)

    def is_main_process(self) -> bool:
        """Whether this rank writes files."""
        return _is_main_process()

    def barrier(self) -> None:
        """Wait for every rank (no-op outside `torch.distributed`)."""
        if dist_ready():
            torch.distributed.barrier()

    @property
    def rank(self) -> int:
        """This process's rank (0 outside `torch.distributed`)."""
        if dist_ready():
            return torch.distributed.get_rank()
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes (1 outside `torch.distributed`)."""
        if dist_ready():
            return torch.distributed.get_world_size()
        return 1


class ReplicatedLayout(ShardLayout):
    """Every rank holds full tensors (single process, DDP): the EMA holds full tensors too."""


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class ShardedLayoutBase(ShardLayout):
    """Shared save-time logic of layouts whose model itself is sharded (FSDP1, FSDP2, ZeRO-3)."""

    is_sharded = True

    def clean_name(self, name: str) -> str:
        """The `state_dict` name of a parameter, without wrapper prefixes.

        Args:
            name (`str`): The name from `named_parameters()`.
        """
        return strip_wrapper_prefixes(name)

    def full_model_tensors(self, model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor] | None:
        from ..selection import is_peft_model

        out: dict[str, torch.Tensor] | None = {} if self.is_main_process() else None
        if is_peft_model(self.save_module(model)):
            # A PEFT folder holds the adapter only, which the EMA provides: never gather the frozen base model.
            return out
        for raw, param in model.named_parameters():
            name = self.clean_name(raw)
            if name in skip:
                continue
            full = self.full_tensor(name, self.local(name, param))
            if out is not None and full is not None:
                out[name] = full.detach().to("cpu", copy=True)
        if out is not None:
            for raw, buf in persistent_buffers(model):
                name = self.clean_name(raw)
                if name not in skip:
                    out[name] = buf.detach().to("cpu", copy=True)
        return out

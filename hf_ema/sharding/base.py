"""How each averaged tensor maps to the shard this rank holds, where that shard lies in the full tensor, and how to
rebuild the full tensor when one is needed.

`ModelEMA` never touches a full tensor of a sharded model during training: it averages `layout.local(...)`. A
checkpoint needs no full tensor either: each rank's shard is one contiguous range of the flattened tensor
(`layout.ema_piece(...)`, a [`FlatPiece`]), which it writes into the file and reads back itself. Full tensors are
gathered for `copy_to` another model, for the DDP-sharded EMA's `swapped()`, and for shards that are not one range.
The layouts of sharded models live in their own modules: `ddp` (the EMA sharded across data-parallel ranks), `fsdp`
(FSDP2 and FSDP1) and `zero3` (DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..compat.torch import persistent_buffers
from .collectives import barrier, dist_ready

if TYPE_CHECKING:
    from ..config import EMAConfig
    from ..selection import Selection

__all__ = [
    "FlatPiece",
    "ReplicatedLayout",
    "ShardLayout",
    "ShardedLayoutBase",
    "persistent_buffers",
    "strip_wrapper_prefixes",
]


def _is_main_process() -> bool:
    if dist_ready():
        return torch.distributed.get_rank() == 0
    return True


@dataclass(frozen=True)
class FlatPiece:
    """Where the part of a tensor that this rank holds lies in the full tensor, flattened in row-major order (the
    order a safetensors file stores it in): elements `[start, start + numel)`.

    An FSDP2 dim-0 shard, an FSDP1 flat-parameter slice, a ZeRO-3 partition and a DDP-sharded chunk are each one
    such range, so every rank can write its part of a file, or read it back, on its own.

    Args:
        shape (`tuple[int, ...]`): The full tensor's shape.
        start (`int` or `None`): The first element held; `None` when the part is not one contiguous range (e.g. a
            DTensor sharded on another dim), and the tensor must be gathered.
        numel (`int`): Number of elements held (the first `numel` of the local tensor; a ZeRO-3 partition may have
            padding after them).
        write (`bool`): Whether this rank writes its part when saving (`False` on ranks that hold a copy of a part
            another rank writes, e.g. every rank but the main process for a replicated tensor).
    """

    shape: tuple[int, ...]
    start: int | None
    numel: int
    write: bool


class ShardLayout:
    """Base class: maps between the model's live tensors, the local shards the EMA holds and full tensors.

    Subclasses handle one way of sharding a model. The base class is the unsharded case.
    """

    #: Short name shown in logs and saved in the EMA state.
    kind: str = "replicated"
    #: Whether the EMA on each rank holds only part of each tensor.
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

    def ema_piece(self, name: str, local: torch.Tensor) -> FlatPiece:
        """Where this rank's EMA tensor `local` lies in the full tensor (for a tensor the EMA tracks, i.e. one that
        went through `local()`). Never a collective.

        Args:
            name (`str`): The tensor's name.
            local (`torch.Tensor`): This rank's EMA tensor.
        """
        return FlatPiece(tuple(local.shape), 0, local.numel(), self.is_main_process())

    def model_tensors(self, model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
        """The model's `state_dict` tensors that the EMA does not hold, by `state_dict` name, as they are (never
        gathered): pass each to `model_piece()`. Never a collective.

        Args:
            model (`nn.Module`): The unwrapped model.
            skip (`set[str]`): Names the EMA already provides.
        """
        return {k: v for k, v in model.state_dict().items() if k not in skip and isinstance(v, torch.Tensor)}

    def model_piece(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, FlatPiece]:
        """This rank's part of one of the model's own tensors (from `model_tensors()`) and where it lies in the
        full tensor. Never a collective.

        Args:
            name (`str`): The tensor's name.
            tensor (`torch.Tensor`): The parameter or buffer.
        """
        return tensor.detach(), FlatPiece(tuple(tensor.shape), 0, tensor.numel(), self.is_main_process())

    def full_model_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The full tensor of one of the model's own tensors on the main process (`None` elsewhere); a collective
        for tensors whose `model_piece()` is not one contiguous range.

        Args:
            name (`str`): The tensor's name.
            tensor (`torch.Tensor`): The parameter or buffer.
        """
        return tensor.detach() if self.is_main_process() else None

    def save_module(self, model: nn.Module) -> nn.Module:
        """The module whose `save_pretrained` / config writes the `ema/` folder (FSDP1 unwraps its root).

        Args:
            model (`nn.Module`): The unwrapped model.
        """
        return model

    def save_pretrained(
        self, module: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], **kwargs: Any
    ) -> None:
        """Write `state_dict` (full tensors, `state_dict` names) with `module.save_pretrained`, on the main process.

        Args:
            module (`nn.Module`): The module returned by `save_module()`.
            folder (`str` or `os.PathLike`): Where to write.
            state_dict (`dict[str, torch.Tensor]`): The tensors to write.
            **kwargs: More arguments of `save_pretrained` (e.g. `max_shard_size`).
        """
        getattr(module, "save_pretrained")(folder, state_dict=state_dict, **kwargs)  # noqa: B009 - a library method

    def is_main_process(self) -> bool:
        """Whether this rank writes files."""
        return _is_main_process()

    def barrier(self) -> None:
        """Wait for every rank (no-op outside `torch.distributed`)."""
        barrier()

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

    def model_tensors(self, model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
        from ..selection import is_peft_model

        if is_peft_model(self.save_module(model)):
            return {}  # a PEFT folder holds the adapter only, which the EMA provides
        # Parameters and persistent buffers, not `state_dict()`: a collective under FSDP1. Tied parameters come once.
        out: dict[str, torch.Tensor] = {}
        for raw, param in model.named_parameters():
            name = self.clean_name(raw)
            if name not in skip:
                out[name] = param
        for raw, buf in persistent_buffers(model):
            name = self.clean_name(raw)
            if name not in skip:
                out.setdefault(name, buf)
        return out

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

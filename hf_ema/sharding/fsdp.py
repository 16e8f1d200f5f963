"""Layouts of FSDP-sharded models: FSDP2 (`fully_shard`, DTensor parameters) and FSDP1 (`use_orig_params=True`).

FSDP2: each parameter is a `DTensor`; the EMA holds an fp32 copy of its `to_local()` shard and remembers the mesh,
placements, shape and stride, so the full tensor is `DTensor.from_local(...).full_tensor()` at save time.

FSDP1: each original parameter is a (possibly empty) slice of the rank's shard of a flat parameter. The EMA follows
that slice of the flat parameter's local shard. At save time each parameter's slices are gathered onto the main
process, one parameter at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..compat.torch import current_accelerator_device
from ..compat.torch_fsdp import (
    fsdp1_flat_params,
    fsdp1_lazy_init,
    fsdp1_local_view,
    fsdp1_reshard,
    fsdp2_lazy_init,
    is_fsdp_flattened,
    local_shape_and_offset,
)
from ..errors import ConfigError
from .base import FlatPiece, ShardedLayoutBase, persistent_buffers, strip_wrapper_prefixes
from .collectives import comm_device, gather_concat

if TYPE_CHECKING:
    from ..config import EMAConfig
    from ..selection import Selection

__all__ = ["FSDP1Layout", "FSDP2Layout", "is_fsdp1", "is_fsdp2"]


def _device_of_mesh(mesh: Any) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    device = current_accelerator_device(mesh.device_type)
    return device if device is not None else torch.device(mesh.device_type)


# ---------------------------------------------------------------------------------------------------- FSDP2
def is_fsdp2(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` (FSDP2 `fully_shard`, or tensor parallelism).

    Args:
        model (`nn.Module`): The model.
    """
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@dataclass(frozen=True)
class _DTensorSpec:
    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]


def _dtensor_piece(spec: _DTensorSpec) -> FlatPiece:
    """Where this rank's local shard lies in the flattened full tensor. A shard on dim 0 (FSDP2 `fully_shard`, also
    on one dim of an HSDP mesh) is a block of whole rows, one contiguous range; it is written by the ranks at
    coordinate 0 of the mesh dims it is replicated over. Any other placement (tensor parallelism, strided shards):
    no range, the tensor is gathered."""
    from torch.distributed.tensor import Replicate, Shard

    shape = tuple(spec.shape)
    coordinate = spec.mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the mesh: it holds nothing
        return FlatPiece(shape, 0, 0, False)
    write = all(c == 0 for c, p in zip(coordinate, spec.placements) if isinstance(p, Replicate))
    sharded = [p for p in spec.placements if not isinstance(p, Replicate)]
    if not sharded or not shape:
        return FlatPiece(shape, 0, math.prod(shape), write)
    if len(sharded) > 1 or type(sharded[0]) is not Shard or sharded[0].dim != 0:
        return FlatPiece(shape, None, 0, write)
    local_shape, offset = local_shape_and_offset(spec.shape, spec.mesh, spec.placements)
    row = math.prod(shape[1:])
    return FlatPiece(shape, min(offset[0], shape[0]) * row, math.prod(local_shape), write)


def _spec_of(tensor: Any) -> _DTensorSpec:  # a DTensor
    return _DTensorSpec(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))


class FSDP2Layout(ShardedLayoutBase):
    """Parameters are `DTensor`s (FSDP2 `fully_shard`, HSDP, tensor parallelism): the EMA holds their local shards.

    Args:
        model (`nn.Module`): The model (unused; the layout reads each parameter's placements).
    """

    kind = "fsdp2"

    def __init__(self, model: nn.Module | None = None) -> None:
        self._specs: dict[str, _DTensorSpec] = {}
        fsdp_types: tuple[type, ...]
        try:
            from torch.distributed.fsdp import FSDPModule

            fsdp_types = (FSDPModule,)
        except ImportError:  # pragma: no cover - torch < 2.6
            fsdp_types = ()
        self._fsdp_modules = [m for m in model.modules() if isinstance(m, fsdp_types)] if model is not None else []
        if self._fsdp_modules:
            # FSDP2's lazy init re-pads uneven shards whose storage was replaced: the EMA's views must be final.
            fsdp2_lazy_init(self._fsdp_modules[0])

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            self._specs[name] = _spec_of(tensor)
            # `_local_tensor` is a view of FSDP2's persistent sharded storage, updated in place by the optimizer.
            return tensor.to_local().detach()
        self._specs.pop(name, None)
        return tensor.detach()

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        from torch.distributed.tensor import DTensor

        spec = self._specs.get(name)
        if spec is None:  # a replicated tensor (buffer, or a parameter outside every `fully_shard`)
            return local_ema if (all_ranks or self.is_main_process()) else None
        dt = DTensor.from_local(
            local_ema.to(_device_of_mesh(spec.mesh)),
            spec.mesh,
            spec.placements,
            run_check=False,
            shape=spec.shape,
            stride=spec.stride,
        )
        full = dt.full_tensor()
        return full if (all_ranks or self.is_main_process()) else None

    def ema_piece(self, name: str, local: torch.Tensor) -> FlatPiece:
        spec = self._specs.get(name)
        if spec is None:
            return super().ema_piece(name, local)
        return _dtensor_piece(spec)

    def model_piece(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, FlatPiece]:
        from torch.distributed.tensor import DTensor

        if not isinstance(tensor, DTensor):
            return super().model_piece(name, tensor)
        return tensor.to_local().detach(), _dtensor_piece(_spec_of(tensor))

    def full_model_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        from torch.distributed.tensor import DTensor

        if not isinstance(tensor, DTensor):
            return super().full_model_tensor(name, tensor)
        full = cast(DTensor, tensor.detach()).full_tensor()  # `detach` keeps a DTensor a DTensor
        return full if self.is_main_process() else None

    def after_write(self, locals_: list[torch.Tensor]) -> None:
        # FSDP2 keeps the root's parameters unsharded after a forward without backward (e.g. evaluation): such a
        # module would not re-gather the shards just written. Resharding makes the next forward gather them.
        for module in self._fsdp_modules:
            module.reshard()

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        spec = self._specs.get(name)
        if spec is None:
            return full
        local_shape, offset = local_shape_and_offset(spec.shape, spec.mesh, spec.placements)
        out = full
        for dim, (start, length) in enumerate(zip(offset, local_shape)):
            out = out.narrow(dim, min(start, full.shape[dim]), length)
        return out.clone()


# ---------------------------------------------------------------------------------------------------- FSDP1
def _fsdp1_class() -> Any:  # `type[FullyShardedDataParallel] | None`
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FullyShardedDataParallel


def is_fsdp1(model: nn.Module) -> bool:
    """Whether `model` is or contains a `FullyShardedDataParallel` (FSDP1) module.

    Args:
        model (`nn.Module`): The model.
    """
    cls = _fsdp1_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


@dataclass(frozen=True)
class _FlatSlice:
    """Where one original parameter lives in its flat parameter."""

    flat_param: Any
    index: int
    group: Any
    start: int  # offset of the parameter in the unsharded (padded) flat parameter
    numel: int
    shape: torch.Size
    shard_numel: int  # numel of each rank's padded shard of the flat parameter

    def bounds(self, group_rank: int) -> tuple[int, int]:
        """`[lo, hi)` of this parameter's flattened elements held by `group_rank`."""
        lo = max(self.start, group_rank * self.shard_numel)
        hi = min(self.start + self.numel, (group_rank + 1) * self.shard_numel)
        return (lo - self.start, hi - self.start) if hi > lo else (0, 0)


class _Fsdp1SelectionView:
    """What `select_tensors` reads from a model, with FSDP1's wrapper prefixes removed and without `state_dict()`
    (which would all-gather the whole model)."""

    def __init__(self, root: nn.Module) -> None:
        self._root = root

    def named_parameters(self, remove_duplicate: bool = True):
        for name, p in self._root.named_parameters(remove_duplicate=remove_duplicate):
            yield strip_wrapper_prefixes(name), p

    def named_buffers(self):
        for name, b in self._root.named_buffers():
            yield strip_wrapper_prefixes(name), b

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        out = dict(self.named_parameters())
        out.update((strip_wrapper_prefixes(n), b) for n, b in persistent_buffers(self._root))
        return out


class FSDP1Layout(ShardedLayoutBase):
    """`FullyShardedDataParallel` with `use_orig_params=True`: the EMA follows each parameter's slice of the rank's
    flat-parameter shard.

    Args:
        model (`nn.Module`): The FSDP1-wrapped model.

    Raises:
        `ConfigError`: a flat parameter was built with `use_orig_params=False`, or with `NO_SHARD`.
    """

    kind = "fsdp1"

    def __init__(self, model: nn.Module) -> None:
        fsdp_cls = _fsdp1_class()  # not None: the model was detected as an FSDP1 model
        for root in fsdp_cls.fsdp_modules(model, root_only=True):
            fsdp1_lazy_init(root)  # fixes each flat parameter's local shard, the storage the EMA follows
        self._by_param: dict[int, _FlatSlice] = {}
        self._by_name: dict[str, _FlatSlice] = {}
        self._handles: list[tuple[nn.Module, Any]] = []
        for flat in fsdp1_flat_params(fsdp_cls, model):
            self._handles.append((flat.module, flat.handle))
            if not flat.use_orig_params:
                raise ConfigError(
                    f"an EMA of an FSDP1 model needs `use_orig_params=True` (accelerate: `fsdp_use_orig_params: "
                    f"true`), got use_orig_params={flat.use_orig_params!r}"
                )
            if flat.strategy == "NO_SHARD":
                raise ConfigError(
                    f"FSDP1 with sharding_strategy={flat.strategy!r} replicates the model: use DDP, "
                    f"or FULL_SHARD / SHARD_GRAD_OP / HYBRID_SHARD"
                )
            for index, param in enumerate(flat.params):
                self._by_param[id(param)] = _FlatSlice(
                    flat_param=flat.flat_param,
                    index=index,
                    group=flat.process_group,
                    start=flat.starts[index],
                    numel=flat.numels[index],
                    shape=flat.shapes[index],
                    shard_numel=flat.shard_numel,
                )
        inner = model
        while isinstance(inner, fsdp_cls):
            inner = inner.module
        self._inner = inner

    def select(self, model: nn.Module, config: EMAConfig) -> Selection:
        from ..selection import is_peft_model, select_tensors

        if config.trainable_only is None and is_peft_model(self._inner):
            config = dataclasses.replace(config, trainable_only=True)
        return select_tensors(cast(nn.Module, _Fsdp1SelectionView(model)), config)  # reads only what it has

    def save_module(self, model: nn.Module) -> nn.Module:
        return self._inner

    def save_pretrained(
        self, module: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], **kwargs: Any
    ) -> None:
        from ..selection import is_peft_model

        save = getattr(module, "save_pretrained")  # noqa: B009 - the library's method, not a submodule
        if not is_peft_model(module):
            save(folder, state_dict=state_dict, **kwargs)
            return
        from safetensors.torch import load_file, save_file

        # PEFT picks the adapter's keys by the names of the modules it finds, and under FSDP1 the units nested
        # in the model add `_fsdp_wrapped_module.` inside those names (PEFT only strips a leading one). Hand it
        # keys under those names, then write the adapter file back under the clean names `from_pretrained` reads.
        peft_names = {
            strip_wrapper_prefixes(n): n.removeprefix("_fsdp_wrapped_module.") for n, _ in module.named_parameters()
        }
        save(folder, state_dict={peft_names.get(k, k): v for k, v in state_dict.items()}, **kwargs)
        for path in Path(folder).glob("adapter_model*.safetensors"):
            tensors = load_file(str(path))
            save_file({strip_wrapper_prefixes(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})

    def local(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        where = self._by_param.get(id(tensor))
        if where is None and is_fsdp_flattened(tensor):
            raise ConfigError(
                f"parameter {name!r} belongs to an FSDP1 unit outside the model given to the EMA: pass the FSDP root "
                f"(under Trainer: `trainer.model` after `accelerator.prepare`), got a model without its root wrapper"
            )
        if where is None:  # a buffer: replicated
            self._by_name.pop(name, None)
            return tensor.detach()
        self._by_name[name] = where
        view = fsdp1_local_view(where.flat_param, where.index)
        lo, hi = where.bounds(where.group.rank())
        if view.numel() != hi - lo:
            raise RuntimeError(
                f"FSDP1 layout mismatch for {name!r}: the flat parameter holds {view.numel()} elements on this rank, "
                f"the layout computed {hi - lo}"
            )
        return view.detach()

    def ema_piece(self, name: str, local: torch.Tensor) -> FlatPiece:
        where = self._by_name.get(name)
        if where is None:
            return super().ema_piece(name, local)
        lo, hi = where.bounds(where.group.rank())
        return FlatPiece(tuple(where.shape), lo, hi - lo, True)

    def model_piece(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, FlatPiece]:
        where = self._by_param.get(id(tensor))
        if where is None:  # a buffer: replicated
            return super().model_piece(name, tensor)
        lo, hi = where.bounds(where.group.rank())
        view = fsdp1_local_view(where.flat_param, where.index).detach()
        return view, FlatPiece(tuple(where.shape), lo, hi - lo, True)

    @torch.no_grad()
    def after_write(self, locals_: list[torch.Tensor]) -> None:
        # FSDP1 keeps the root's flat parameter unsharded after a forward without backward (and SHARD_GRAD_OP keeps
        # every one): such a handle would not re-gather the shards just written, and a training forward after
        # `swapped()` would even run on the EMA. Reshard them, as `summon_full_params` does on exit.
        for module, handle in self._handles:
            fsdp1_reshard(module, handle)

    def full_tensor(self, name: str, local_ema: torch.Tensor, *, all_ranks: bool = False) -> torch.Tensor | None:
        where = self._by_name.get(name)
        if where is None:
            return local_ema if (all_ranks or self.is_main_process()) else None
        group = where.group
        sizes = [hi - lo for lo, hi in (where.bounds(r) for r in range(group.size()))]
        width = max(sizes)
        if width == 0:
            full = local_ema.new_empty(where.shape)
            return full if (all_ranks or self.is_main_process()) else None
        # Equal-size pieces for the collective: each rank's slice, zero-padded to the longest slice.
        padded = torch.zeros(width, dtype=local_ema.dtype, device=comm_device(group))
        padded[: local_ema.numel()].copy_(local_ema.reshape(-1))
        flat = gather_concat(padded, group, all_ranks)
        if flat is None or not (all_ranks or self.is_main_process()):
            return None
        parts = flat.view(len(sizes), width)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).view(where.shape)

    def shard_full_tensor(self, name: str, full: torch.Tensor, local_like: torch.Tensor) -> torch.Tensor:
        where = self._by_name.get(name)
        if where is None:
            return full
        lo, hi = where.bounds(where.group.rank())
        return full.reshape(-1)[lo:hi].clone()

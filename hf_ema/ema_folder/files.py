"""The files hf-ema lays out itself: the loadable weights (when it knows the keys the library writes, or for a plain
module) and the exact copy `ema_state.safetensors`. Each is created at its final size with its header; the plan
says where every rank writes its part."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..utils.jsonio import write_json
from ..utils.paths import TENSORS_NAME
from ..utils.safetensors_files import TensorSpec, create_file, dtype_name, file_layout, split_into_files
from .plan import FilePart, PartEntry, SaveJob, SavePlan, TensorLocation
from .sources import SaveSources, Source, SourceKind

if TYPE_CHECKING:
    from torch import nn

    from ..sharding.base import ShardLayout

__all__ = ["WeightsFiles", "holds_exactly", "own_keys", "plan_direct", "plan_exact", "same_tensor_key"]

# File dtypes that hold every value of an EMA dtype exactly, so the EMA reads back bit for bit from them.
_HOLDS = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}
_PT_METADATA = {"format": "pt"}


def holds_exactly(file_dtype: torch.dtype, ema_dtype: torch.dtype) -> bool:
    """Whether a file dtype holds every value of an EMA dtype.

    Args:
        file_dtype (`torch.dtype`): The dtype in the file.
        ema_dtype (`torch.dtype`): The EMA's dtype.
    """
    return file_dtype == ema_dtype or file_dtype in _HOLDS.get(ema_dtype, ())


@dataclass(frozen=True)
class WeightsFiles:
    """How the library names and tags its weights files.

    Args:
        name (`str`): The single file's name (`model.safetensors`, `adapter_model.safetensors`, ...); split files
            are named after it, with `name.index.json` beside them.
        metadata (`dict[str, str]`): The safetensors metadata of each file.
        index_metadata (`dict[str, Any]`): The index's metadata besides `total_size`.
    """

    name: str
    metadata: dict[str, str] = field(default_factory=lambda: dict(_PT_METADATA))
    index_metadata: dict[str, Any] = field(default_factory=dict)


def same_tensor_key(tensor: torch.Tensor, by_object: bool) -> Any:
    """What makes two entries of a `state_dict` one tensor (to store a tied weight once).

    Args:
        tensor (`torch.Tensor`): The tensor.
        by_object (`bool`): Compare objects rather than storage (the parameters of a sharded model).
    """
    # In a replicated model's `state_dict`, a tied weight is one storage under two names (`state_dict()` detaches
    # each name anew); the parameters of a sharded model come once each from `named_parameters()`.
    if by_object or tensor.numel() == 0 or tensor.device.type == "meta":
        return id(tensor)
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def own_keys(sources: SaveSources, by_object: bool) -> list[tuple[str, Source]]:
    """The keys of a plain `nn.Module`'s `model.safetensors` (a custom loop): the model's other tensors and the EMA's
    under their own names, each tensor stored once (tied aliases dropped).

    Args:
        sources (`SaveSources`): The save's tensors.
        by_object (`bool`): See [`same_tensor_key`].
    """
    out, seen = [], set()
    for name, tensor in sources.model_tensors().items():
        same = same_tensor_key(tensor, by_object)
        if same not in seen:
            seen.add(same)
            out.append((name, Source(SourceKind.MODEL, name)))
    out.extend((source.name, source) for source in sources.weight_sources())
    return out


def _spec(sources: SaveSources, key: str, source: Source, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(key, dtype, tuple(sources.piece(source).shape))


def _group(specs: list[TensorSpec], name: str, max_shard_size: int | str | None) -> list[tuple[str, list[TensorSpec]]]:
    if not specs:
        return []
    if max_shard_size is None:
        return [(name, specs)]
    return split_into_files(specs, name.replace(".safetensors", "{suffix}.safetensors"), max_shard_size)


def _create_files(
    folder: Path, groups: list[tuple[str, list[TensorSpec]]], sources_of: dict[str, Source], metadata: dict[str, str]
) -> list[FilePart]:
    """Create each file with its header, at its final size; the entries every rank writes its part of."""
    out = []
    for file_name, specs in groups:
        layout = file_layout(file_name, specs, metadata)
        create_file(folder / file_name, layout)
        entries = tuple(
            PartEntry(key, sources_of[key], dtype_name(spec.dtype), layout.offsets[key])
            for key, spec in layout.specs.items()
        )
        out.append(FilePart(file_name, entries))
    return out


def plan_exact(job: SaveJob, located: dict[str, TensorLocation]) -> SavePlan:
    """`ema_state.safetensors`: the EMA tensors that the loadable weights do not hold exactly (a bf16 model's fp32
    EMA; a bias-corrected EMA's plain EMA, whose weights hold the corrected values, and its `theta_0`), in the EMA's
    dtype. Returns its files and where every tensor is stored exactly.

    Args:
        job (`SaveJob`): The save.
        located (`dict[str, TensorLocation]`): Where the loadable weights hold EMA tensors exactly.
    """
    sources = job.sources
    missing = [s for s in sources.exact_sources() if s.key not in located]
    specs = [_spec(sources, s.key, s, sources.ema_dtype(s)) for s in missing]
    groups = _group(specs, TENSORS_NAME, job.max_shard_size)
    files = _create_files(job.folder, groups, {s.key: s for s in missing}, _PT_METADATA)
    locations = dict(located)
    locations.update((spec.key, TensorLocation(file, spec.key)) for file, group in groups for spec in group)
    return SavePlan(tuple(files), locations)


def _total_parameters(layout: ShardLayout, module: nn.Module) -> int:
    # `PreTrainedModel.num_parameters()`, each parameter at its full size rather than this rank's shard.
    return sum(math.prod(layout.model_piece(n, p)[1].shape) for n, p in module.named_parameters())


def _write_index(job: SaveJob, weights: WeightsFiles, groups: list[tuple[str, list[TensorSpec]]]) -> None:
    metadata = dict(weights.index_metadata)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = _total_parameters(job.ema.layout, job.module)
    metadata["total_size"] = sum(spec.nbytes for _, specs in groups for spec in specs)
    index = {"metadata": metadata, "weight_map": {s.key: file for file, specs in groups for s in specs}}
    write_json(job.folder / f"{weights.name}.index.json", index, sort_keys=True)


def plan_direct(
    job: SaveJob, keys: list[tuple[str, Source]], weights: WeightsFiles, split: int | str | None
) -> SavePlan:
    """Create the loadable weights (the keys the library writes, in the model's dtypes, split as it splits them)
    and the exact copy; the plan every rank writes.

    Args:
        job (`SaveJob`): The save.
        keys (`list[tuple[str, Source]]`): Each key of the weights and the tensor it holds, in the library's order.
        weights (`WeightsFiles`): How the weights files are named and tagged.
        split (`int` or `str`, *optional*): Largest weights file; `None` for one file.
    """
    sources = job.sources
    sources_of = dict(keys)
    groups = _group([_spec(sources, k, s, sources.weight_dtype(s)) for k, s in keys], weights.name, split)
    files = _create_files(job.folder, groups, sources_of, weights.metadata)
    if len(groups) > 1:
        _write_index(job, weights, groups)
    located: dict[str, TensorLocation] = {}
    weight_keys: dict[str, TensorLocation] = {}
    for file, specs in groups:
        for spec in specs:
            source = sources_of[spec.key]
            if source.kind in (SourceKind.AVERAGED, SourceKind.CORRECTED):
                weight_keys.setdefault(source.name, TensorLocation(file, spec.key))
            exact = source.is_ema and holds_exactly(spec.dtype, sources.ema_dtype(source))
            if exact and source.name not in located:
                located[source.name] = TensorLocation(file, spec.key)
    exact_plan = plan_exact(job, located)
    return SavePlan(tuple(files) + exact_plan.files, exact_plan.locations, weight_keys)

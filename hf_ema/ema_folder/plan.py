"""The typed plan of one save: which files every rank writes its part of, what each file holds where, and where each
EMA tensor is stored exactly. The main process makes it; every rank receives it (as JSON) and writes its parts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..utils.paths import TENSORS_NAME
from ..utils.safetensors_files import dtype_from_name
from .sources import SaveSources, Source, SourceKind

if TYPE_CHECKING:
    from torch import nn

    from ..model_ema import ModelEMA
    from ..sharding.collectives import Ranks

__all__ = ["FilePart", "LibraryWrites", "PartEntry", "SaveJob", "SavePlan", "TensorLocation"]


@dataclass(frozen=True)
class PartEntry:
    """One tensor of a file: every rank writes its part of it at `offset` plus its part's start.

    Args:
        key (`str`): The tensor's key in the file.
        source (`Source`): The tensor it holds.
        dtype (`str`): Its safetensors dtype (`"BF16"`, `"F32"`, ...).
        offset (`int`): Byte offset of its data in the file.
    """

    key: str
    source: Source
    dtype: str
    offset: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a `torch.dtype`."""
        return dtype_from_name(self.dtype)


@dataclass(frozen=True)
class FilePart:
    """A safetensors file created at its final size (header written), whose tensors every rank writes its part of.

    Args:
        name (`str`): The file's name in the folder.
        entries (`tuple[PartEntry, ...]`): Its tensors.
    """

    name: str
    entries: tuple[PartEntry, ...]


@dataclass(frozen=True)
class TensorLocation:
    """Where an EMA tensor is stored exactly (in its own dtype or one that holds every value of it).

    Args:
        file (`str`): The file's name in the folder.
        key (`str`): The tensor's key in that file.
    """

    file: str
    key: str


@dataclass(frozen=True)
class SavePlan:
    """What every rank writes and what `ema_state.json` records.

    Args:
        files (`tuple[FilePart, ...]`): The files every rank writes its part of (those the library wrote itself
            are not among them).
        locations (`dict[str, TensorLocation]`): Where each EMA tensor is stored exactly, by name.
        weights (`dict[str, TensorLocation]`, *optional*): Where the loadable weights hold each averaged tensor, by
            name, when hf-ema laid them out (the library's own keys, e.g. a PEFT adapter's).
    """

    files: tuple[FilePart, ...]
    locations: dict[str, TensorLocation]
    weights: dict[str, TensorLocation] = field(default_factory=dict)

    @property
    def exact_tensors(self) -> bool:
        """Whether the folder has an exact copy (`ema_state.safetensors`, possibly split) beside the weights."""
        stem = TENSORS_NAME.removesuffix(".safetensors")
        return any(f.name.startswith(stem) for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON, to hand from the main process to the other ranks."""
        return {
            "files": [
                {
                    "name": f.name,
                    "entries": [[e.key, e.source.kind.value, e.source.name, e.dtype, e.offset] for e in f.entries],
                }
                for f in self.files
            ],
            "locations": {name: [loc.file, loc.key] for name, loc in self.locations.items()},
            "weights": {name: [loc.file, loc.key] for name, loc in self.weights.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SavePlan:
        """The plan `to_json` wrote.

        Args:
            data (`dict`): `to_json()`'s output.
        """
        files = tuple(
            FilePart(
                f["name"],
                tuple(
                    PartEntry(key, Source(SourceKind(kind), name), dtype, offset)
                    for key, kind, name, dtype, offset in f["entries"]
                ),
            )
            for f in data["files"]
        )
        locations = {name: TensorLocation(*loc) for name, loc in data["locations"].items()}
        return cls(files, locations, {name: TensorLocation(*loc) for name, loc in data.get("weights", {}).items()})


class LibraryWrites(enum.Enum):
    """How the model's own `save_pretrained` writes the weights when hf-ema cannot lay them out itself (it
    transforms the tensors it saves, or reads `module.state_dict()` whatever it is given)."""

    #: The EMA is swapped into the model (a collective for the DDP-sharded EMA) and the library saves the model.
    SWAPPED = "swapped"
    #: The EMA of a sharded model is gathered onto the main process and given to the library as `state_dict`.
    GATHERED = "gathered"


@dataclass
class SaveJob:
    """Everything one save works from.

    Args:
        ema (`ModelEMA`): The EMA being saved.
        sources (`SaveSources`): Its tensors and the model's others, by source.
        module (`nn.Module`): The module whose `save_pretrained` and config write the folder.
        folder (`Path`): The temporary folder every rank writes into (renamed into place by the commit).
        ranks (`Ranks`): The ranks saving together.
        output_dir (`Path`): The final folder (for messages).
        max_shard_size (`int` or `str`, *optional*): Largest weights file; `None` for one file.
    """

    ema: ModelEMA
    sources: SaveSources
    module: nn.Module
    folder: Path
    ranks: Ranks
    output_dir: Path
    max_shard_size: int | str | None


def encode_layout(choice: SavePlan | LibraryWrites) -> dict[str, Any]:
    """The main process's first decision, as JSON: the plan, or how the library writes the weights.

    Args:
        choice (`SavePlan` or `LibraryWrites`): The decision.
    """
    if isinstance(choice, LibraryWrites):
        return {"library_writes": choice.value}
    return {"plan": choice.to_json()}


def decode_layout(data: dict[str, Any]) -> SavePlan | LibraryWrites:
    """The decision `encode_layout` wrote.

    Args:
        data (`dict`): `encode_layout()`'s output.
    """
    if "library_writes" in data:
        return LibraryWrites(data["library_writes"])
    return SavePlan.from_json(data["plan"])

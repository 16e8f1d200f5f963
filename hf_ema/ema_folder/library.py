"""The model library's own `save_pretrained` (transformers, PEFT, diffusers): which keys it writes for the EMA, in
which order and files (found with placeholders), and, when hf-ema cannot lay the files out itself, the library
writing the weights with the EMA swapped in or gathered."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..selection import is_peft_model
from ..sharding.base import ShardedLayoutBase
from ..utils.jsonio import read_json
from ..utils.safetensors_files import dtype_from_name, read_header
from .files import WeightsFiles, holds_exactly, plan_exact, same_tensor_key
from .plan import LibraryWrites, SaveJob, SavePlan, TensorLocation
from .sources import Source, SourceKind

__all__ = [
    "default_max_shard_size",
    "library_writes",
    "passes_state_dict",
    "placeholder_keys",
    "shards_files",
]

logger = logging.getLogger(__name__)


def _save_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(getattr(module, "save_pretrained")).parameters)  # noqa: B009 - a method
    except (AttributeError, TypeError, ValueError):
        return {}


def passes_state_dict(module: nn.Module) -> bool:
    """Whether the library's `save_pretrained` writes the `state_dict` it is given.

    Args:
        module (`nn.Module`): The module that saves.
    """
    # transformers' `save_pretrained` takes `state_dict` and PEFT's reads it from `**kwargs`; diffusers' (and any
    # `save_pretrained` without the argument) writes `module.state_dict()` whatever it is given.
    return is_peft_model(module) or "state_dict" in _save_parameters(module)


def shards_files(module: nn.Module) -> bool:
    """Whether the library splits its weights into `...-0000i-of-0000N` files (PEFT adapters are one file).

    Args:
        module (`nn.Module`): The module that saves.
    """
    return not hasattr(module, "save_pretrained") or (
        "max_shard_size" in _save_parameters(module) and not is_peft_model(module)
    )


def default_max_shard_size(module: nn.Module) -> int | str | None:
    """The library's default `max_shard_size`, or `None` when it writes one file.

    Args:
        module (`nn.Module`): The module that saves.
    """
    param = _save_parameters(module).get("max_shard_size")
    if param is None or param.default is inspect.Parameter.empty or not shards_files(module):
        return None
    return param.default


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _placeholder_state(job: SaveJob) -> tuple[dict[str, torch.Tensor], list[Source]]:
    """A `state_dict` of one-element placeholders, `tensor([i])` for source `i`, under every name the library is
    given (a tied tensor once, under each of its names)."""
    ids: list[Source] = []
    state: dict[str, torch.Tensor] = {}
    placeholders: dict[Any, torch.Tensor] = {}
    by_object = isinstance(job.ema.layout, ShardedLayoutBase)
    for name, tensor in job.sources.model_tensors().items():
        same = same_tensor_key(tensor, by_object)
        if same not in placeholders:
            placeholders[same] = torch.tensor([len(ids)], dtype=torch.int64)
            ids.append(Source(SourceKind.MODEL, name))
        state[name] = placeholders[same]
    for source in job.sources.weight_sources():
        placeholder = torch.tensor([len(ids)], dtype=torch.int64)
        ids.append(source)
        for key in (source.name, *job.sources.aliases(source.name)):
            state[key] = placeholder
    return state, ids


def _read_placeholders(weights: list[Path], count: int) -> tuple[dict[str, int], dict[str, str]] | None:
    """The placeholder index under each key of the files the library wrote, and their metadata; `None` when a
    value is not one of the placeholders (the library transformed them)."""
    values: dict[str, int] = {}
    metadata: dict[str, str] | None = None
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            if metadata is None:
                metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                value = f.get_tensor(key)
                if value.dtype != torch.int64 or tuple(value.shape) != (1,) or not 0 <= int(value) < count:
                    return None
                values[key] = int(value)
    return values, metadata or {}


def placeholder_keys(job: SaveJob, scratch: Path) -> tuple[list[tuple[str, Source]], WeightsFiles] | None:
    """Which keys the library's `save_pretrained` writes, in which order, for which source.

    It is found by letting the library save one-element placeholders instead of the weights: it drops tied
    duplicates and renames and orders keys as it does for the real tensors (with `max_shard_size=1`, one file per
    tensor, so its index gives the order). The real files are then laid out from the real shapes and every rank
    writes its part. Returns `None` when the library did more than pick, rename and order the tensors (e.g. merged
    them); the caller then lets it write the real tensors.

    Args:
        job (`SaveJob`): The save.
        scratch (`Path`): An empty folder for the placeholder files.
    """
    state, ids = _placeholder_state(job)
    kwargs = {"max_shard_size": 1} if shards_files(job.module) else {}
    try:
        with _no_progress_bars():  # transformers shows one for its files, here one per placeholder
            job.ema.layout.save_pretrained(job.module, scratch, state, **kwargs)
    except Exception as err:  # e.g. a library that checks the shapes it is given
        logger.info("%s.save_pretrained refused placeholders (%s)", type(job.module).__name__, err)
        return None
    indexes = sorted(scratch.glob("*.safetensors.index.json"))
    weights = sorted(scratch.glob("*.safetensors"))
    found = _read_placeholders(weights, len(ids))
    if found is None or not (len(indexes) == 1 or len(weights) == 1):
        return None
    values, metadata = found
    if len(indexes) == 1:
        index = read_json(indexes[0])
        # Files are numbered in the order the library filled them.
        order = [key for key, _ in sorted(index["weight_map"].items(), key=lambda kv: (kv[1], kv[0]))]
        index_metadata = {k: v for k, v in index.get("metadata", {}).items() if k != "total_size"}
        files = WeightsFiles(indexes[0].name.removesuffix(".index.json"), metadata, index_metadata)
    else:
        order = list(values)
        files = WeightsFiles(weights[0].name, metadata)
    if not files.metadata:
        files = WeightsFiles(files.name, index_metadata=files.index_metadata)
    if sorted(order) != sorted(values) or len(set(values.values())) != len(values):
        return None
    for path in indexes + weights:
        path.unlink()
    return [(key, ids[values[key]]) for key in order], files


def _locate_written(job: SaveJob) -> dict[str, TensorLocation]:
    """Where the weights a library wrote itself hold each EMA tensor exactly: under its name or a tied alias, with
    its full shape and a dtype that holds it."""
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for path in sorted(job.folder.glob("*.safetensors")):
        _, header, _ = read_header(path)
        for key, entry in header.items():
            found.setdefault(key, (path.name, entry["dtype"], tuple(entry["shape"])))
    located = {}
    # A bias-corrected EMA's weights hold the corrected values: only its copied tensors are its own there.
    for source in (s for s in job.sources.weight_sources() if s.is_ema):
        local, piece = job.sources.local(source)
        for key in (source.name, *job.sources.aliases(source.name)):
            hit = found.get(key)
            if hit is None or hit[2] != tuple(piece.shape):
                continue
            try:
                exact = holds_exactly(dtype_from_name(hit[1]), local.dtype)
            except ValueError:  # a dtype torch has no name for here
                exact = False
            if exact:
                located[source.name] = TensorLocation(hit[0], key)
            break
    return located


def _gathered_state(job: SaveJob) -> dict[str, torch.Tensor] | None:
    # The whole EMA and the model's other tensors, gathered onto the main process (collectives): only for a library
    # whose `save_pretrained` transforms the tensors (it needs them all at once).
    full = job.ema.full_state_dict(dtype="model")
    base = job.ema.layout.full_model_tensors(job.ema.model, job.sources.provided())
    if full is None:
        return None
    state = dict(base or {})
    for name, tensor in full.items():
        for key in (name, *job.sources.aliases(name)):
            state[key] = tensor
    return state


def _write_with_library(job: SaveJob, state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """On the main process: the library writes the weights (the EMA swapped into the model when `state` is
    `None`, else the gathered `state`); then the exact copy of the EMA tensors they do not hold exactly."""
    module, max_shard_size = job.module, job.max_shard_size
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None and shards_files(module) else {}
    if state is None:
        getattr(module, "save_pretrained")(job.folder, **kwargs)  # noqa: B009 - the library's method, not a submodule
    else:
        job.ema.layout.save_pretrained(module, job.folder, state, **kwargs)
    return plan_exact(job, _locate_written(job)).to_json()


def library_writes(job: SaveJob, how: LibraryWrites) -> SavePlan:
    """The library writes the weights itself (a collective: every rank swaps the EMA in or gathers it); the plan
    left for every rank is the exact copy.

    Args:
        job (`SaveJob`): The save.
        how (`LibraryWrites`): With the EMA swapped into the model, or gathered.
    """
    what = f"write `{job.output_dir}`"
    if how is LibraryWrites.SWAPPED:
        # Its `save_pretrained` writes `module.state_dict()`: put the EMA into the model (a collective for the
        # DDP-sharded EMA) and let it write.
        with job.ema.swapped():
            return SavePlan.from_json(job.ranks.on_main(what, lambda: _write_with_library(job, None)))
    state = _gathered_state(job)
    return SavePlan.from_json(job.ranks.on_main(what, lambda: _write_with_library(job, state)))

"""Writing and reading an `ema/` folder: `save_pretrained`-style weights plus the EMA state, written atomically."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .config import CONFIG_NAME
from .errors import CheckpointError
from .model_ema import ModelEMA
from .selection import is_peft_model
from .sharding.base import FlatPiece, ShardedLayoutBase, ShardLayout, comm_device, dist_ready
from .sharding.rank_files import read_rank_shard
from .utils.atomic import atomic_folder, recover_folder
from .utils.jsonio import read_json, write_json
from .utils.paths import EMA_DIRNAME, STATE_NAME, TENSORS_NAME
from .utils.safetensors_files import (
    TensorSpec,
    create_file,
    dtype_from_name,
    dtype_name,
    file_layout,
    read_elements,
    read_header,
    split_into_files,
    write_elements,
)
from .utils.validation import check_optional_bool, check_size

__all__ = [
    "EMA_DIRNAME",
    "FORMAT_VERSION",
    "STATE_NAME",
    "TENSORS_NAME",
    "atomic_folder",
    "load_ema",
    "read_ema_state",
    "save_ema",
]

logger = logging.getLogger(__name__)


#: Layout of the `ema/` folder (docs/reference/ema_format.md). 1: the main process wrote the weights from a gathered
#: EMA, and each rank its own shards to `shards/`. 2: every rank writes its part of each weights file in place, and
#: `ema_state.json` maps each EMA tensor to the file and key that hold it exactly.
FORMAT_VERSION = 2

# File dtypes that hold every value of an EMA dtype exactly, so the EMA reads back bit for bit from them.
_HOLDS = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


def _holds_exactly(file_dtype: torch.dtype, ema_dtype: torch.dtype) -> bool:
    return file_dtype == ema_dtype or file_dtype in _HOLDS.get(ema_dtype, ())


# ---------------------------------------------------------------------------------------------------- ranks
class _Ranks:
    """The few collectives of a save, over every rank (no-ops in a single process); messages are JSON."""

    def __init__(self, layout: ShardLayout) -> None:
        self.active = dist_ready() and layout.world_size > 1
        self.main = layout.is_main_process()
        self.rank = layout.rank
        self.world_size = layout.world_size
        self.device = comm_device() if self.active else torch.device("cpu")

    def broadcast(self, message: Any = None) -> Any:
        """The main process's `message`, on every rank."""
        if not self.active:
            return message
        data = json.dumps(message).encode("utf-8") if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        torch.distributed.broadcast(buf, src=0)
        return message if self.main else json.loads(bytes(buf.cpu().numpy()).decode("utf-8"))

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` is true on every rank."""
        if not self.active:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def all_gather_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Every rank's `rows` (as many on every rank): a `(world_size, len(rows), width)` int64 tensor."""
        mine = torch.tensor(rows, dtype=torch.int64)
        if not self.active:
            return mine.unsqueeze(0)
        mine = mine.to(self.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, mine)
        return torch.stack([t.cpu() for t in out])


def _on_main(ranks: _Ranks, what: str, step: Callable[[], Any]) -> Any:
    """Run `step` on the main process and hand its JSON result to every rank. If it fails, every rank raises: the
    main process its own error, the others a `CheckpointError` quoting it."""
    if ranks.main:
        try:
            result = step()
        except BaseException as err:
            ranks.broadcast({"error": f"{type(err).__name__}: {err}"})
            raise
        ranks.broadcast({"result": result})
        return result
    message = ranks.broadcast()
    if "error" in message:
        raise CheckpointError(f"the main process failed to {what}: {message['error']}")
    return message["result"]


# ---------------------------------------------------------------------------------------------------- tensors
class _Sources:
    """What a save writes, by source: `("e", name)` an averaged EMA tensor, `("c", name)` a copied one, `("m", name)`
    one of the model's own tensors that the EMA does not hold. Each rank holds its part of each."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema
        self.layout = ema.layout
        self._tensors = {t.name: t for t in ema.named_tensors()}
        self._model: dict[str, torch.Tensor] | None = None

    def provided(self) -> set[str]:
        """The names the EMA provides (its tensors and their tied aliases)."""
        out = set(self._tensors)
        out.update(a for aliases in self.ema.selection.aliases.values() for a in aliases)
        return out

    def ema_sources(self) -> list[tuple[str, str]]:
        return [("e" if t.averaged else "c", t.name) for t in self._tensors.values()]

    def model_tensors(self) -> dict[str, torch.Tensor]:
        if self._model is None:
            self._model = self.layout.model_tensors(self.ema.model, self.provided())
        return self._model

    def local(self, kind: str, name: str) -> tuple[torch.Tensor, FlatPiece]:
        """This rank's part of a source, and where it lies in the full tensor."""
        if kind == "m":
            return self.layout.model_piece(name, self.model_tensors()[name])
        local = self._tensors[name].ema
        return local, self.layout.ema_piece(name, local)

    def full(self, kind: str, name: str) -> torch.Tensor | None:
        """The full tensor of a source on the main process (a collective)."""
        if kind == "m":
            return self.layout.full_model_tensor(name, self.model_tensors()[name])
        return self.layout.full_tensor(name, self.local(kind, name)[0])

    def weight_dtype(self, kind: str, name: str) -> torch.dtype:
        """The dtype of a source in the loadable weights: that of the model tensor it stands for."""
        if kind == "e":
            return self._tensors[name].live.dtype
        return self.local(kind, name)[0].dtype

    def spec(self, key: str, source: tuple[str, str], dtype: torch.dtype | None = None) -> TensorSpec:
        _, piece = self.local(*source)
        return TensorSpec(key, dtype or self.weight_dtype(*source), tuple(piece.shape))


# ---------------------------------------------------------------------------------------------------- file layout
def _save_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(getattr(module, "save_pretrained")).parameters)  # noqa: B009 - a method
    except (AttributeError, TypeError, ValueError):
        return {}


def _passes_state_dict(module: nn.Module) -> bool:
    # transformers' `save_pretrained` takes `state_dict` and PEFT's reads it from `**kwargs`; diffusers' (and any
    # `save_pretrained` without the argument) writes `module.state_dict()` whatever it is given.
    return is_peft_model(module) or "state_dict" in _save_parameters(module)


def _shards_files(module: nn.Module) -> bool:
    # Whether the library splits its weights into `...-0000i-of-0000N` files (PEFT adapters are one file).
    return not hasattr(module, "save_pretrained") or (
        "max_shard_size" in _save_parameters(module) and not is_peft_model(module)
    )


def _default_max_shard_size(module: nn.Module) -> int | str | None:
    param = _save_parameters(module).get("max_shard_size")
    if param is None or param.default is inspect.Parameter.empty or not _shards_files(module):
        return None
    return param.default


def _same_tensor_key(tensor: torch.Tensor, by_object: bool) -> Any:
    # In a replicated model's `state_dict`, a tied weight is one storage under two names (`state_dict()` detaches
    # each name anew); the parameters of a sharded model come once each from `named_parameters()`.
    if by_object or tensor.numel() == 0 or tensor.device.type == "meta":
        return id(tensor)
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


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


def _placeholder_keys(
    ema: ModelEMA, sources: _Sources, module: nn.Module, scratch: Path
) -> tuple[list[tuple[str, tuple[str, str]]], dict[str, Any]] | None:
    """Which keys the library's `save_pretrained` writes, in which order, for which source.

    It is found by letting the library save one-element placeholders, `tensor([i])` for source `i`, instead of the
    weights: it drops tied duplicates and renames and orders keys as it does for the real tensors (with
    `max_shard_size=1`, one file per tensor, so its index gives the order). The real files are then laid out from
    the real shapes and every rank writes its part. Returns `None` when the library did more than pick, rename and
    order the tensors (e.g. merged them); the caller then lets it write the real tensors.
    """
    ids: list[tuple[str, str]] = []
    state: dict[str, torch.Tensor] = {}
    placeholders: dict[Any, torch.Tensor] = {}
    by_object = isinstance(ema.layout, ShardedLayoutBase)
    for name, tensor in sources.model_tensors().items():
        same = _same_tensor_key(tensor, by_object)
        if same not in placeholders:
            placeholders[same] = torch.tensor([len(ids)], dtype=torch.int64)
            ids.append(("m", name))
        state[name] = placeholders[same]
    for kind, name in sources.ema_sources():
        placeholder = torch.tensor([len(ids)], dtype=torch.int64)
        ids.append((kind, name))
        for key in (name, *ema.selection.aliases.get(name, [])):
            state[key] = placeholder
    kwargs = {"max_shard_size": 1} if _shards_files(module) else {}
    try:
        with _no_progress_bars():  # transformers shows one for its files, here one per placeholder
            ema.layout.save_pretrained(module, scratch, state, **kwargs)
    except Exception as err:  # e.g. a library that checks the shapes it is given
        logger.info("%s.save_pretrained refused placeholders (%s)", type(module).__name__, err)
        return None
    indexes = sorted(scratch.glob("*.safetensors.index.json"))
    weights = sorted(scratch.glob("*.safetensors"))
    info: dict[str, Any] = {}
    if len(indexes) == 1:
        index = read_json(indexes[0])
        # Files are numbered in the order the library filled them.
        order = [key for key, _ in sorted(index["weight_map"].items(), key=lambda kv: (kv[1], kv[0]))]
        info["name"] = indexes[0].name.removesuffix(".index.json")
        info["index_metadata"] = {k: v for k, v in index.get("metadata", {}).items() if k != "total_size"}
    elif len(weights) == 1:
        order = None
        info["name"] = weights[0].name
    else:
        return None
    values: dict[str, int] = {}
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            info.setdefault("metadata", dict(f.metadata() or {}))
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                value = f.get_tensor(key)
                if value.dtype != torch.int64 or tuple(value.shape) != (1,) or not 0 <= int(value) < len(ids):
                    return None
                values[key] = int(value)
    order = order if order is not None else list(values)
    if sorted(order) != sorted(values) or len(set(values.values())) != len(values):
        return None
    for path in indexes + weights:
        path.unlink()
    return [(key, ids[values[key]]) for key in order], info


def _own_keys(sources: _Sources, by_object: bool) -> list[tuple[str, tuple[str, str]]]:
    # A plain `nn.Module` (custom loop): the model's other tensors and the EMA's under their own names, each tensor
    # stored once (tied aliases dropped), in one `model.safetensors`.
    out, seen = [], set()
    for name, tensor in sources.model_tensors().items():
        same = _same_tensor_key(tensor, by_object)
        if same not in seen:
            seen.add(same)
            out.append((name, ("m", name)))
    out.extend((name, (kind, name)) for kind, name in sources.ema_sources())
    return out


def _group(specs: list[TensorSpec], name: str, max_shard_size: int | str | None) -> list[tuple[str, list[TensorSpec]]]:
    if not specs:
        return []
    if max_shard_size is None:
        return [(name, specs)]
    return split_into_files(specs, name.replace(".safetensors", "{suffix}.safetensors"), max_shard_size)


def _create_files(
    folder: Path, groups: list[tuple[str, list[TensorSpec]]], sources_of: dict[str, tuple[str, str]], metadata: dict
) -> list[dict]:
    """Create each file with its header, at its final size; the entries every rank writes its part of."""
    out = []
    for file_name, specs in groups:
        layout = file_layout(file_name, specs, metadata)
        create_file(folder / file_name, layout)
        entries = [
            [key, *sources_of[key], dtype_name(spec.dtype), layout.offsets[key]] for key, spec in layout.specs.items()
        ]
        out.append({"name": file_name, "entries": entries})
    return out


def _total_parameters(layout: ShardLayout, module: nn.Module) -> int:
    # `PreTrainedModel.num_parameters()`, each parameter at its full size rather than this rank's shard.
    return sum(math.prod(layout.model_piece(n, p)[1].shape) for n, p in module.named_parameters())


def _plan_exact(
    sources: _Sources, folder: Path, located: dict[str, list[str]], max_shard_size: int | str | None
) -> tuple[list[dict], dict[str, list[str]]]:
    """`ema_state.safetensors`: the EMA tensors that the loadable weights do not hold exactly (a bf16 model's fp32
    EMA), in the EMA's dtype. Returns its files and where every EMA tensor is stored exactly.

    Args:
        located: EMA name -> `[file, key]` of the loadable weights that hold it exactly.
    """
    specs, sources_of = [], {}
    for kind, name in sources.ema_sources():
        if name not in located:
            specs.append(sources.spec(name, (kind, name), sources.local(kind, name)[0].dtype))
            sources_of[name] = (kind, name)
    groups = _group(specs, TENSORS_NAME, max_shard_size)
    files = _create_files(folder, groups, sources_of, {"format": "pt"})
    locations = dict(located)
    locations.update((spec.key, [file, spec.key]) for file, group in groups for spec in group)
    return files, locations


def _plan_direct(
    ema: ModelEMA,
    sources: _Sources,
    folder: Path,
    keys: list[tuple[str, tuple[str, str]]],
    info: dict[str, Any],
    max_shard_size: int | str | None,
    module: nn.Module,
) -> dict:
    """Create the loadable weights (the keys the library writes, in the model's dtypes, split as it splits them)
    and the exact copy; the plan every rank writes."""
    sources_of = dict(keys)
    split = max_shard_size if _shards_files(module) else None  # a PEFT adapter is always one file
    groups = _group([sources.spec(k, s) for k, s in keys], info["name"], split)
    files = _create_files(folder, groups, sources_of, info.get("metadata") or {"format": "pt"})
    if len(groups) > 1:
        metadata = dict(info.get("index_metadata") or {})
        if "total_parameters" in metadata:
            metadata["total_parameters"] = _total_parameters(ema.layout, module)
        metadata["total_size"] = sum(spec.nbytes for _, specs in groups for spec in specs)
        index = {"metadata": metadata, "weight_map": {s.key: file for file, specs in groups for s in specs}}
        with open(folder / f"{info['name']}.index.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    located: dict[str, list[str]] = {}
    for file, specs in groups:
        for spec in specs:
            kind, name = sources_of[spec.key]
            exact = kind != "m" and _holds_exactly(spec.dtype, sources.local(kind, name)[0].dtype)
            if exact and name not in located:
                located[name] = [file, spec.key]
    exact_files, locations = _plan_exact(sources, folder, located, max_shard_size)
    return {"files": files + exact_files, "locations": locations}


def _locate_written(ema: ModelEMA, sources: _Sources, folder: Path) -> dict[str, list[str]]:
    """Where the weights a library wrote itself hold each EMA tensor exactly: under its name or a tied alias, with
    its full shape and a dtype that holds it."""
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        _, header, _ = read_header(path)
        for key, entry in header.items():
            found.setdefault(key, (path.name, entry["dtype"], tuple(entry["shape"])))
    located = {}
    for kind, name in sources.ema_sources():
        local, piece = sources.local(kind, name)
        for key in (name, *ema.selection.aliases.get(name, [])):
            hit = found.get(key)
            if hit is None or hit[2] != tuple(piece.shape):
                continue
            try:
                exact = _holds_exactly(dtype_from_name(hit[1]), local.dtype)
            except ValueError:  # a dtype torch has no name for here
                exact = False
            if exact:
                located[name] = [hit[0], key]
            break
    return located


def _choose(ema: ModelEMA, sources: _Sources, module: nn.Module, tmp: Path, max_shard_size) -> dict:
    """On the main process: how the weights are written, and for a direct write, its files (created, empty)."""
    if not hasattr(module, "save_pretrained"):
        keys = _own_keys(sources, isinstance(ema.layout, ShardedLayoutBase))
        info = {"name": "model.safetensors", "metadata": {"format": "pt"}}
        return {"mode": "direct", "plan": _plan_direct(ema, sources, tmp, keys, info, max_shard_size, module)}
    passes = _passes_state_dict(module)
    if passes:
        scratch = tmp / ".layout"
        scratch.mkdir()
        try:
            found = _placeholder_keys(ema, sources, module, scratch)
            if found is not None:
                for path in scratch.iterdir():  # the library's other files: config.json, adapter_config.json, ...
                    os.replace(path, tmp / path.name)
                plan = _plan_direct(ema, sources, tmp, *found, max_shard_size, module)
                return {"mode": "direct", "plan": plan}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        logger.info(
            "%s.save_pretrained transforms the tensors it saves: it writes the EMA itself", type(module).__name__
        )
    if not isinstance(ema.layout, ShardedLayoutBase):
        return {"mode": "swap"}
    if not passes:
        raise CheckpointError(
            f"cannot save the EMA of this {ema.layout.kind}-sharded {type(module).__name__}: its `save_pretrained` "
            f"ignores the `state_dict` it is given and would write the model's own weights instead of the EMA"
        )
    return {"mode": "gathered"}


def _library_writes(ema: ModelEMA, sources: _Sources, module: nn.Module, tmp: Path, max_shard_size, state) -> dict:
    """The library writes the weights itself (the EMA swapped into the model, or the gathered EMA as `state`);
    then find where it stored each EMA tensor and create the exact copy of those it does not hold exactly."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None and _shards_files(module) else {}
    if state is None:
        getattr(module, "save_pretrained")(tmp, **kwargs)  # noqa: B009 - the library's method, not a submodule
    else:
        ema.layout.save_pretrained(module, tmp, state, **kwargs)
    files, locations = _plan_exact(sources, tmp, _locate_written(ema, sources, tmp), max_shard_size)
    return {"files": files, "locations": locations}


def _gathered_state(ema: ModelEMA, sources: _Sources) -> dict[str, torch.Tensor] | None:
    # The whole EMA and the model's other tensors, gathered onto the main process (collectives): only for a library
    # whose `save_pretrained` transforms the tensors (it needs them all at once).
    full = ema.full_state_dict(dtype="model")
    base = ema.layout.full_model_tensors(ema.model, sources.provided())
    if full is None:
        return None
    state = dict(base or {})
    for name, tensor in full.items():
        for key in (name, *ema.selection.aliases.get(name, [])):
            state[key] = tensor
    return state


# ---------------------------------------------------------------------------------------------------- writing
def _write_parts(ranks: _Ranks, sources: _Sources, folder: Path, files: list[dict], shared: bool) -> None:
    """Every rank writes its part of every tensor of `files` in place. Without a filesystem that every rank sees
    (`shared=False`), each rank sends its part to the main process, which writes it: the main process then holds
    one rank's part of one tensor at a time."""
    table = None
    if not shared:
        rows = []
        for f in files:
            for _, kind, name, _, _ in f["entries"]:
                _, piece = sources.local(kind, name)
                rows.append([-1 if piece.start is None else piece.start, piece.numel, int(piece.write)])
        table = ranks.all_gather_rows(rows) if rows else None
    row = 0
    for f in files:
        fd = os.open(folder / f["name"], os.O_WRONLY) if (shared or ranks.main) else None
        try:
            for _, kind, name, code, offset in f["entries"]:
                dtype = dtype_from_name(code)
                size = torch.empty((), dtype=dtype).element_size()
                local, piece = sources.local(kind, name)
                if piece.start is None:
                    # Not one contiguous range of the tensor (a DTensor sharded on another dim): gather it.
                    full = sources.full(kind, name)
                    if ranks.main:
                        assert fd is not None and full is not None  # the main process opens the files, gets the tensor
                        write_elements(fd, offset, full.reshape(-1), dtype)
                    del full
                elif shared:
                    if piece.write and piece.numel:
                        assert fd is not None  # every rank opens the files on a shared filesystem
                        write_elements(fd, offset + piece.start * size, local.reshape(-1)[: piece.numel], dtype)
                else:
                    assert table is not None  # gathered above whenever a part goes through the main process
                    _send_part(ranks, fd, offset, size, dtype, local, piece, table[:, row])
                row += 1
            if fd is not None:
                os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)


def _send_part(ranks: _Ranks, fd, offset: int, size: int, dtype, local, piece: FlatPiece, rows: torch.Tensor) -> None:
    # rows[r] = (start, numel, write) of rank r's part of this tensor.
    assert piece.start is not None  # a contiguous range (the other case is gathered by the caller)
    if ranks.main:
        if piece.write and piece.numel:
            write_elements(fd, offset + piece.start * size, local.reshape(-1)[: piece.numel], dtype)
        for r in range(ranks.world_size):
            start, numel, write = (int(v) for v in rows[r])
            if r == ranks.rank or not (write and numel):
                continue
            buf = torch.empty(numel * size, dtype=torch.uint8, device=ranks.device)
            torch.distributed.recv(buf, src=r)
            write_elements(fd, offset + start * size, buf, torch.uint8)
            del buf
    elif piece.write and piece.numel:
        part = local.reshape(-1)[: piece.numel].to(ranks.device, dtype=dtype).contiguous()
        torch.distributed.send(part.view(torch.uint8), dst=0)


def _write_state(ema: ModelEMA, folder: Path, plan: dict, extra_state: dict[str, Any] | None) -> None:
    from . import __version__

    meta = {
        "format_version": FORMAT_VERSION,
        "hf_ema_version": __version__,
        "step": ema.step,
        "num_updates": ema.num_updates,
        "num_skipped": ema.num_skipped,
        "decay": ema.last_decay,
        "config": ema.config.to_dict(),
        "layout": ema.layout.kind,
        "world_size": ema.layout.world_size,
        "exact_tensors": any(f["name"].startswith(TENSORS_NAME.removesuffix(".safetensors")) for f in plan["files"]),
        "names": ema.names,
        "copied_names": ema.copied_names,
        "tensors": {name: {"file": file, "key": key} for name, (file, key) in plan["locations"].items()},
    }
    if extra_state:
        meta.update(extra_state)
    write_json(folder / STATE_NAME, meta)


def save_ema(
    ema: ModelEMA,
    output_dir: str | os.PathLike,
    processing_class: Any | None = None,
    extra_state: dict[str, Any] | None = None,
    *,
    max_shard_size: int | str | None = None,
    shared_filesystem: bool | None = None,
) -> Path | None:
    """Write the EMA as a `save_pretrained` folder, atomically. A collective call: every rank must make it.

    The folder holds what the model's own `save_pretrained` writes (`config.json`, `model.safetensors` or
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`, `generation_config.json`; for a PEFT
    model `adapter_config.json` and `adapter_model.safetensors`; for a diffusers model
    `diffusion_pytorch_model.safetensors`), with the EMA in the model's dtype; the tokenizer files when
    `processing_class` is given; `ema_state.safetensors` with the EMA tensors that the weights cannot hold exactly
    (the fp32 EMA of a bf16 model); `ema_state.json` and `ema_config.json`. See docs/reference/ema_format.md.

    Nothing is gathered: every rank writes its own part of each tensor straight into the files (each part is one
    contiguous byte range of the file), and the main process renames the folder into place once all are written.
    Without a filesystem that every rank sees, the parts go through the main process, one at a time.

    Args:
        ema (`ModelEMA`): The EMA to save.
        output_dir (`str` or `os.PathLike`): The folder to write, e.g. `checkpoint-100/ema`.
        processing_class (*optional*): A tokenizer / processor saved alongside.
        extra_state (`dict`, *optional*): More JSON-serialisable entries for `ema_state.json`.
        max_shard_size (`int` or `str`, *optional*): Largest weights file, e.g. `"5GB"`; bigger models are split
            into several files as `save_pretrained` splits them. Defaults to the model's `save_pretrained` default.
        shared_filesystem (`bool`, *optional*): Whether every rank sees `output_dir`'s filesystem; detected when
            `None`.

    Returns:
        `Path` or `None`: the folder on the main process, `None` on other ranks.

    Raises:
        `CheckpointError`: the model is sharded and its `save_pretrained` ignores `state_dict` (it would write
            the model's own weights), or another rank failed.
    """
    check_size("max_shard_size", max_shard_size, optional=True)
    check_optional_bool("shared_filesystem", shared_filesystem)
    output_dir = Path(output_dir)
    ema.wait()
    ranks = _Ranks(ema.layout)
    sources = _Sources(ema)
    module = ema.layout.save_module(ema.model)
    if max_shard_size is None:
        max_shard_size = _default_max_shard_size(module)
    what = f"write `{output_dir}`"
    folder = atomic_folder(output_dir) if ranks.main else None
    entered = committed = False

    def prepare() -> dict:
        nonlocal entered
        assert folder is not None  # `_on_main` runs this on the main process only
        tmp = folder.__enter__()
        entered = True
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        ema.config.to_json_file(tmp / CONFIG_NAME)
        return {"tmp": str(tmp), **_choose(ema, sources, module, tmp, max_shard_size)}

    def commit() -> bool:
        nonlocal committed
        _write_state(ema, tmp, plan, extra_state)
        assert folder is not None  # `_on_main` runs this on the main process only
        folder.__exit__(None, None, None)
        committed = True
        return True

    try:
        step = _on_main(ranks, what, prepare)
        tmp, plan = Path(step["tmp"]), step.get("plan")
        if step["mode"] == "swap":
            # Its `save_pretrained` writes `module.state_dict()`: put the EMA into the model (a collective for the
            # DDP-sharded EMA) and let it write.
            with ema.swapped():
                plan = _on_main(ranks, what, lambda: _library_writes(ema, sources, module, tmp, max_shard_size, None))
        elif step["mode"] == "gathered":
            state = _gathered_state(ema, sources)
            plan = _on_main(ranks, what, lambda: _library_writes(ema, sources, module, tmp, max_shard_size, state))
            del state
        shared = shared_filesystem
        if shared is None:
            first = plan["files"][0]["name"] if plan["files"] else None
            shared = ranks.all_true(first is None or (tmp / first).is_file())
        error = None
        try:
            _write_parts(ranks, sources, tmp, plan["files"], shared)
        except Exception as err:
            error = err
        if not ranks.all_true(error is None):  # every rank learns that the folder is incomplete
            if error is not None:
                raise error
            raise CheckpointError(f"another rank failed to write its part of `{output_dir}`; see its error")
        _on_main(ranks, f"commit `{output_dir}`", commit)
    except BaseException as err:
        if entered and not committed and folder is not None:
            folder.__exit__(type(err), err, err.__traceback__)
        raise
    return output_dir if ranks.main else None


def read_ema_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Read `ema_state.json` from an `ema/` folder.

    Args:
        folder (`str` or `os.PathLike`): The `ema/` folder.
    """
    recover_folder(folder)  # a replace interrupted between its two renames
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"`{folder}` is not an hf-ema folder: {STATE_NAME} is missing")
    try:
        state = read_json(path)
    except OSError as err:  # unreadable: one clear line (a garbled file is a CheckpointError from read_json)
        raise CheckpointError(f"could not read `{path}`: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"`{path}` is corrupt: it is not a JSON object")
    return state


_WEIGHT_FILES = ("model", "diffusion_pytorch_model")


def _read_full_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # Format 1: the exact copy when there is one, else the weights under the names `save_pretrained` and
    # diffusers' `save_pretrained` use (one file or an index).
    exact = folder / TENSORS_NAME
    if exact.is_file():
        return load_file(str(exact))
    for stem in _WEIGHT_FILES:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return load_file(str(single))
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index)["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for name in files:
                out.update(load_file(str(folder / name)))
            return out
    raise CheckpointError(f"`{folder}` holds no EMA weights ({TENSORS_NAME} or model.safetensors)")


def _read_format1(ema: ModelEMA, folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    own = read_rank_shard(ema, folder, meta)
    if own is not None:
        return own
    full = _read_full_tensors(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, local, _, _ in ema.named_tensors():
        source = full.get(name)
        if source is None:
            for alias in ema.selection.aliases.get(name, []):
                source = full.get(alias)
                if source is not None:
                    break
        if source is None:
            raise CheckpointError(f"`{folder}` has no tensor {name!r}; was it saved for another model?")
        tensors[name] = ema.layout.shard_full_tensor(name, source, local)
    return tensors


def _read_parts(ema: ModelEMA, folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's part of each EMA tensor, read from the file and key that `ema_state.json` names for it (its byte
    range only: nothing is gathered, whatever the world size that wrote the folder)."""
    locations = meta.get("tensors") or {}
    headers: dict[str, tuple[int, dict]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, local, _, _ in ema.named_tensors():
        where = locations.get(name)
        if where is None:
            raise CheckpointError(f"`{folder}` has no tensor {name!r}; was it saved for another model?")
        path = folder / where["file"]
        if where["file"] not in headers:
            if not path.is_file():
                raise CheckpointError(f"`{folder}` is incomplete: its {STATE_NAME} names {where['file']}, missing")
            start, header, _ = read_header(path)
            headers[where["file"]] = (start, header)
        start, header = headers[where["file"]]
        entry = header.get(where["key"])
        piece = ema.layout.ema_piece(name, local)
        if entry is None or tuple(entry["shape"]) != tuple(piece.shape):
            shape = None if entry is None else tuple(entry["shape"])
            raise CheckpointError(
                f"`{folder}` holds {name!r} with shape {shape} but this model's has {tuple(piece.shape)}; was it "
                f"saved for another model?"
            )
        if piece.start is None:  # not one contiguous range (a DTensor sharded on another dim)
            with safe_open(str(path), framework="pt") as f:
                out[name] = ema.layout.shard_full_tensor(name, f.get_tensor(where["key"]), local)
            continue
        file_dtype = dtype_from_name(entry["dtype"])
        size = torch.empty((), dtype=file_dtype).element_size()
        target = torch.empty(local.shape, dtype=local.dtype, device=local.device)
        read_elements(path, start + entry["data_offsets"][0] + piece.start * size, piece.numel, file_dtype, target)
        if piece.numel < target.numel():  # the padding of the last ZeRO-3 partition
            target.view(-1)[piece.numel :].zero_()
        out[name] = target
    return out


@torch.no_grad()
def load_ema(ema: ModelEMA, folder: str | os.PathLike) -> dict[str, Any]:
    """Restore `ema` from an `ema/` folder written by `save_ema` (resume). Every rank calls it; not a collective.

    Each rank reads only its own part of each tensor (a byte range of the file that holds it exactly), whatever the
    number of ranks that wrote the folder. Folders of format 1 (with `shards/`) are read too.

    Args:
        ema (`ModelEMA`): The EMA to restore, built for the same model.
        folder (`str` or `os.PathLike`): The `ema/` folder.

    Returns:
        `dict`: the folder's `ema_state.json`.

    Raises:
        `CheckpointError`: the folder is not an EMA folder, is newer than this hf-ema, or holds another model.
    """
    folder = Path(folder)
    meta = read_ema_state(folder)
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"`{folder}` was written by a newer hf-ema (format {meta['format_version']}); upgrade hf-ema to read it"
        )
    ema.wait()
    tensors = _read_parts(ema, folder, meta) if version >= 2 else _read_format1(ema, folder, meta)
    if tensors is not None:
        ema.load_state_dict(
            {
                "tensors": tensors,
                "step": meta["step"],
                "num_updates": meta["num_updates"],
                "num_skipped": meta.get("num_skipped", 0),
                "decay": meta.get("decay"),
            }
        )
    return meta

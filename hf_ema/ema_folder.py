"""Writing and reading an `ema/` folder: `save_pretrained`-style weights plus the EMA state, written atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME
from .errors import CheckpointError
from .model_ema import STATE_FORMAT_VERSION, ModelEMA
from .selection import is_peft_model
from .sharding.rank_files import load_rank_shard, save_rank_shard
from .utils.atomic import atomic_folder
from .utils.paths import EMA_DIRNAME, STATE_NAME, TENSORS_NAME

__all__ = [
    "EMA_DIRNAME",
    "STATE_NAME",
    "TENSORS_NAME",
    "atomic_folder",
    "load_ema",
    "read_ema_state",
    "save_ema",
]

logger = logging.getLogger(__name__)


def _needs_exact_tensors(ema: ModelEMA) -> bool:
    if is_peft_model(ema.layout.save_module(ema.model)):
        # Adapter files rename keys (the adapter name is dropped); keep our own exact copy, it is small.
        return True
    return any(e.dtype != live.dtype for e, live in zip(ema.shadow, ema.live_tensors))


def _write_weights(
    ema: ModelEMA, folder: Path, full: dict[str, torch.Tensor], exact: bool, base: dict[str, torch.Tensor]
) -> None:
    model = ema.layout.save_module(ema.model)
    model_dtype_full = {}
    live_dtypes = {n: live.dtype for n, live in zip(ema.names, ema.live_tensors)}
    for name, tensor in full.items():
        model_dtype_full[name] = tensor.to(live_dtypes.get(name, tensor.dtype))
    # `base`: the model's other tensors (full, gathered by the layout for a sharded model).
    state = dict(base)
    for name, tensor in model_dtype_full.items():
        state[name] = tensor
        for alias in ema.selection.aliases.get(name, []):
            state[alias] = tensor
    if hasattr(model, "save_pretrained"):
        ema.layout.save_pretrained(model, folder, state)
    else:
        # A plain nn.Module in a custom loop: one safetensors file, shared tensors stored once.
        seen: dict[int, str] = {}
        flat = {}
        for key, value in state.items():
            ptr = value.data_ptr()
            if ptr in seen and value.numel() > 0:
                continue
            seen[ptr] = key
            flat[key] = value.detach().contiguous().cpu()
        save_file(flat, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if exact:
        save_file(
            {k: v.contiguous() for k, v in full.items()},
            str(folder / TENSORS_NAME),
            metadata={"format": "pt", "producer": "hf_ema"},
        )


def save_ema(
    ema: ModelEMA,
    output_dir: str | os.PathLike,
    processing_class: Any | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path | None:
    """Write the EMA as a `save_pretrained` folder, atomically, from the main process.

    A collective call under `torch.distributed` (sharded EMAs are gathered one tensor at a time): every rank must
    make it. For a full model the folder holds `config.json`, `model.safetensors` and `generation_config.json`;
    for a PEFT model `adapter_config.json` and `adapter_model.safetensors`; the tokenizer files when
    `processing_class` is given; `ema_state.json` (step, updates, decay, config, format version) and
    `ema_config.json`; and `ema_state.safetensors` with the EMA in its own dtype when the weights file cannot hold
    it exactly.

    Args:
        ema (`ModelEMA`): The EMA to save.
        output_dir (`str` or `os.PathLike`): The folder to write, e.g. `checkpoint-100/ema`.
        processing_class (*optional*): A tokenizer / processor saved alongside.
        extra_state (`dict`, *optional*): More JSON-serialisable entries for `ema_state.json`.

    Returns:
        `Path` or `None`: the folder on the main process, `None` on other ranks.
    """
    output_dir = Path(output_dir)
    full = ema.full_state_dict(dtype="ema")
    provided = set(ema.names) | set(ema.copied_names)
    provided.update(alias for aliases in ema.selection.aliases.values() for alias in aliases)
    base = ema.layout.full_model_tensors(ema.model, provided)
    path = None
    if ema.layout.is_main_process():
        exact = _needs_exact_tensors(ema)
        with atomic_folder(output_dir) as tmp:
            _write_weights(ema, tmp, full, exact, base)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)
            ema.config.to_json_file(tmp / CONFIG_NAME)
            from . import __version__

            meta = {
                "format_version": STATE_FORMAT_VERSION,
                "hf_ema_version": __version__,
                "step": ema.step,
                "num_updates": ema.num_updates,
                "decay": ema.last_decay,
                "config": ema.config.to_dict(),
                "layout": ema.layout.kind,
                "world_size": ema.layout.world_size,
                "exact_tensors": exact,
                "names": ema.names,
                "copied_names": ema.copied_names,
            }
            if extra_state:
                meta.update(extra_state)
            with open(tmp / STATE_NAME, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
        path = output_dir
    ema.layout.barrier()
    if ema.layout.is_sharded:
        # Each rank's own shards, so that resuming at the same world size needs no gather.
        save_rank_shard(ema, output_dir)
        ema.layout.barrier()
    return path


def read_ema_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Read `ema_state.json` from an `ema/` folder.

    Args:
        folder (`str` or `os.PathLike`): The `ema/` folder.
    """
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"`{folder}` is not an hf-ema folder: {STATE_NAME} is missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_full_tensors(folder: Path) -> dict[str, torch.Tensor]:
    exact = folder / TENSORS_NAME
    if exact.is_file():
        return load_file(str(exact))
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for name in files:
            out.update(load_file(str(folder / name)))
        return out
    raise CheckpointError(f"`{folder}` holds no EMA weights ({TENSORS_NAME} or model.safetensors)")


@torch.no_grad()
def load_ema(ema: ModelEMA, folder: str | os.PathLike) -> dict[str, Any]:
    """Restore `ema` from an `ema/` folder written by `save_ema` (resume). Every rank calls it.

    Args:
        ema (`ModelEMA`): The EMA to restore, built for the same model.
        folder (`str` or `os.PathLike`): The `ema/` folder.

    Returns:
        `dict`: the folder's `ema_state.json`.
    """
    folder = Path(folder)
    meta = read_ema_state(folder)
    if meta.get("format_version", 0) > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"`{folder}` was written by a newer hf-ema (format {meta['format_version']}); upgrade hf-ema to read it"
        )
    if load_rank_shard(ema, folder, meta):
        return meta
    full = _read_full_tensors(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, local in zip(ema.names + ema.copied_names, ema.shadow + ema.copied):
        source = full.get(name)
        if source is None:
            for alias in ema.selection.aliases.get(name, []):
                source = full.get(alias)
                if source is not None:
                    break
        if source is None:
            raise CheckpointError(f"`{folder}` has no tensor {name!r}; was it saved for another model?")
        tensors[name] = ema.layout.shard_full_tensor(name, source, local)
    ema.load_state_dict(
        {"tensors": tensors, "step": meta["step"], "num_updates": meta["num_updates"], "decay": meta.get("decay")}
    )
    return meta

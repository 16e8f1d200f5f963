"""Weighted sums of `save_pretrained` weight folders, streamed tensor by tensor through safetensors.

Shared by `merge_checkpoints` (checkpoint merging) and `reconstruct` (post-hoc EMA): both compute
`sum_i c_i * theta_i` over folders holding the same model. Each input tensor is read with `safe_open` and the file is
closed again right away, so the memory mapping of the inputs never grows past one tensor; the sum is accumulated in
fp32 (fp64 for fp64 weights) and written in the source dtype. Peak memory is about one output file (the whole
model, or one shard of a sharded checkpoint) plus a few tensors.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigMismatchError
from .utils.jsonio import read_json
from .utils.paths import STATE_NAME, TRAINER_STATE_NAME, checkpoint_step

__all__ = [
    "WeightFolder",
    "check_compatible",
    "check_safetensors_file",
    "copy_metadata",
    "read_weight_folder",
    "write_weighted_sum",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"

# Files that make a folder loadable with `from_pretrained` besides the weights: configs, tokenizer, processor and
# remote code. Training state (optimizer.pt, trainer_state.json, rng_state*.pth) is deliberately left out.
METADATA_NAMES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
METADATA_PATTERNS = ("tokenizer*", "vocab*", "*.model", "*.tiktoken", "*.py")

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

#: The largest safetensors header accepted (the format's own readers refuse more than 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Check a safetensors file's framing from its header alone, before any reader maps it.

    The first 8 bytes give the header length: it must fit in the file and be at most `MAX_HEADER_BYTES` (a
    garbage length is refused here, without reading or allocating it); the header must be a JSON object whose
    tensors' byte ranges end exactly at the end of the file (a truncated copy ends early).

    Args:
        path (`str` or `os.PathLike`): The file.

    Returns:
        `dict`: the parsed header.

    Raises:
        `CheckpointError`: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"`{path}` is not a safetensors file: {size} bytes, shorter than its header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise CheckpointError(
                    f"`{path}` is truncated or not a safetensors file: its header length says {length} bytes, "
                    f"the file has {size}"
                )
            raw = f.read(length)
    except OSError as err:
        raise CheckpointError(f"could not read `{path}`: {err.strerror or err}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"`{path}` is corrupt or not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"`{path}` is corrupt or not a safetensors file: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"`{path}` is corrupt: tensor {name!r} has no valid data offsets in the header")
        end = max(end, offsets[1])
    data = size - 8 - length
    if end != data:
        state = "truncated" if end > data else "corrupt"
        raise CheckpointError(
            f"`{path}` is {state}: its tensors take {end} bytes after the header, the file has {data}"
        )
    return header


def _safetensors_error(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"could not read `{path}`: {type(err).__name__}: {' '.join(str(err).split())}")


@dataclass
class WeightFolder:
    """The weights of one `save_pretrained` folder, described from the safetensors headers only.

    Args:
        folder (`Path`): The folder.
        kind (`str`): `"model"` (one `model.safetensors`), `"sharded"` (`model.safetensors.index.json`) or
            `"adapter"` (a PEFT `adapter_model.safetensors`).
        weight_map (`dict[str, str]`): Tensor name to the file (relative to `folder`) holding it.
        specs (`dict[str, tuple[str, tuple[int, ...]]]`): Tensor name to its safetensors dtype and shape.
        step (`int`, *optional*): The training step the folder was saved at, when known.
    """

    folder: Path
    kind: str
    weight_map: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    step: int | None = None
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """The weight files, in a fixed order."""
        return sorted(set(self.weight_map.values()))


def _infer_step(folder: Path) -> int | None:
    for name, key in ((STATE_NAME, "step"), (TRAINER_STATE_NAME, "global_step")):
        path = folder / name
        if path.is_file():
            try:
                value = read_json(path).get(key)
            except (OSError, ValueError):
                value = None
            if isinstance(value, int):
                return value
    for candidate in (folder, folder.parent):
        step = checkpoint_step(candidate)
        if step is not None:
            return step
    return None


def read_weight_folder(folder: str | Path) -> WeightFolder:
    """Describe the weights of a `save_pretrained` folder without loading them.

    Args:
        folder (`str` or `Path`): A folder with `adapter_model.safetensors`, `model.safetensors` or
            `model.safetensors.index.json`.

    Raises:
        `CheckpointError`: when the folder does not exist or holds no safetensors weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder `{folder}` does not exist")
    if (folder / ADAPTER_FILE).is_file():
        kind, files = "adapter", None
        weight_map_files = {ADAPTER_FILE}
    elif (folder / INDEX_FILE).is_file():
        kind = "sharded"
        files = _read_index(folder / INDEX_FILE)
        weight_map_files = set(files.values())
    elif (folder / SINGLE_FILE).is_file():
        kind, files = "model", None
        weight_map_files = {SINGLE_FILE}
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise CheckpointError(
            f"`{folder}` holds no safetensors weights ({ADAPTER_FILE}, {SINGLE_FILE} or {INDEX_FILE}); found {found!r}"
        )
    weight_map: dict[str, str] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    file_metadata: dict[str, dict[str, str]] = {}
    for name in sorted(weight_map_files):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"`{folder}` is incomplete: its index names {name!r}, which is missing")
        check_safetensors_file(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                file_metadata[name] = dict(f.metadata() or {})
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    view = f.get_slice(key)
                    specs[key] = (view.get_dtype(), tuple(view.get_shape()))
                    weight_map[key] = name
        except (SafetensorError, OSError, ValueError) as err:
            raise _safetensors_error(path, err) from None
    if files is not None:
        missing = sorted(set(files) - set(weight_map))
        if missing:
            raise CheckpointError(
                f"`{folder}` is incomplete: {len(missing)} indexed tensors are missing, e.g. {missing[:3]!r}"
            )
    return WeightFolder(folder, kind, weight_map, specs, _infer_step(folder), file_metadata)


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = read_json(path)
    except OSError as err:
        raise CheckpointError(f"could not read `{path}`: {type(err).__name__}: {err}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"`{path}` is corrupt: it has no `weight_map` of tensor names to files")
    return weight_map


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


#: Entries of `config.json` / `adapter_config.json` that do not change what the weights mean: where they came from,
#: the dtype they were saved in, the library versions, label names and runtime switches. Checkpoints that differ only
#: in these merge; any other difference (a head count, a rope setting, a LoRA scaling) is a different model.
CONFIG_KEYS_IGNORED = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "base_model_name_or_path",
        "revision",
        "_commit_hash",
        "transformers_version",
        "_diffusers_version",
        "peft_version",
        "torch_dtype",
        "dtype",
        "id2label",
        "label2id",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "inference_mode",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
    }
)


def _config_differences(config: dict, ref: dict, prefix: str = "") -> list[str]:
    """`key: value vs ref value` for every entry of the two configs that changes what the weights mean."""
    out = []
    for key in sorted(set(config) | set(ref)):
        if key in CONFIG_KEYS_IGNORED:
            continue
        mine, theirs = config.get(key), ref.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            out.extend(_config_differences(mine, theirs, f"{prefix}{key}."))
        elif mine != theirs:
            out.append(f"{prefix}{key} {mine!r} vs {theirs!r}")
    return out


def check_compatible(folders: Sequence[WeightFolder], allow_config_mismatch: bool = False) -> None:
    """Fail unless every folder holds the same model: same kind, architecture, tensor names, shapes and dtypes, and
    configs (`config.json`, `adapter_config.json`) equal but for `CONFIG_KEYS_IGNORED`.

    Only headers and configs are read, so this runs before anything is written.

    Args:
        folders (`Sequence[WeightFolder]`): The folders; the last one is the reference.
        allow_config_mismatch (`bool`, *optional*, defaults to `False`): Accept configs that differ (the tensors
            must still match).

    Raises:
        `CheckpointError`: naming the first folder that differs and how.
        `ConfigMismatchError`: the configs differ (each differing entry named) and `allow_config_mismatch` is
            `False`.
    """
    ref = folders[-1]
    ref_config = _read_json(ref.folder / "config.json") or {}
    ref_adapter = _read_json(ref.folder / "adapter_config.json") or {}
    for other in folders[:-1]:
        where = f"`{other.folder}` does not match `{ref.folder}`"
        if other.kind != ref.kind:
            raise CheckpointError(f"{where}: it holds {other.kind!r} weights, the other {ref.kind!r} weights")
        config = _read_json(other.folder / "config.json") or {}
        for key in ("model_type", "architectures"):
            if key in config and key in ref_config and config[key] != ref_config[key]:
                raise CheckpointError(f"{where}: config.json `{key}` is {config[key]!r}, not {ref_config[key]!r}")
        adapter = _read_json(other.folder / "adapter_config.json") or {}
        if adapter.get("peft_type") != ref_adapter.get("peft_type"):
            raise CheckpointError(
                f"{where}: adapter `peft_type` is {adapter.get('peft_type')!r}, not {ref_adapter.get('peft_type')!r}"
            )
        missing = sorted(set(ref.specs) - set(other.specs))
        extra = sorted(set(other.specs) - set(ref.specs))
        if missing or extra:
            raise CheckpointError(
                f"{where}: different tensors ({len(missing)} missing, e.g. {missing[:3]!r}; "
                f"{len(extra)} extra, e.g. {extra[:3]!r})"
            )
        for key, (dtype, shape) in ref.specs.items():
            other_dtype, other_shape = other.specs[key]
            if other_shape != shape:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {other_shape}, not {shape}")
            if other_dtype != dtype:
                raise CheckpointError(f"{where}: tensor {key!r} has dtype {other_dtype}, not {dtype}")
        if allow_config_mismatch:
            continue
        for name, mine, theirs in (("config.json", config, ref_config), ("adapter_config.json", adapter, ref_adapter)):
            differences = _config_differences(mine, theirs)
            if differences:
                raise ConfigMismatchError(
                    f"{where}: its {name} describes another model ({'; '.join(differences)}); the merged folder "
                    f"would take the last one's config. Pass allow_config_mismatch=True to merge them anyway"
                )


def _read_tensor(folder: WeightFolder, key: str) -> torch.Tensor:
    # Open, read, close: `get_tensor` copies out of the memory map, and closing unmaps the file, so pages of the
    # inputs never pile up in this process's resident memory while many checkpoints are merged.
    path = folder.folder / folder.weight_map[key]
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:  # the file changed since its header was read
        raise _safetensors_error(path, err) from None


@torch.no_grad()
def write_weighted_sum(
    sources: Sequence[WeightFolder],
    weights: Sequence[float],
    out: Path,
    progress: bool = True,
    desc: str = "merging",
) -> int:
    """Write `sum_i weights[i] * sources[i]` into `out`, in the layout and dtypes of the last source.

    Floating-point tensors are summed in fp32 (fp64 for fp64 tensors) and cast back; other tensors (integer
    buffers) are copied from the last source. Call `check_compatible` first.

    Args:
        sources (`Sequence[WeightFolder]`): The folders, compatible with each other.
        weights (`Sequence[float]`): One coefficient per source (any sign).
        out (`Path`): An existing, empty folder.
        progress (`bool`, *optional*, defaults to `True`): Show a tqdm progress bar over tensors.
        desc (`str`, *optional*, defaults to `"merging"`): Label of the progress bar.

    Returns:
        `int`: the number of tensors written.
    """
    from tqdm.auto import tqdm

    ref = sources[-1]
    by_file: dict[str, list[str]] = {}
    for key, name in ref.weight_map.items():
        by_file.setdefault(name, []).append(key)
    written = 0
    with tqdm(total=len(ref.weight_map), desc=desc, unit="tensor", disable=not progress) as bar:
        for name in ref.files:
            tensors: dict[str, torch.Tensor] = {}
            for key in by_file[name]:
                dtype = ref.specs[key][0]
                if dtype not in _FLOAT_DTYPES:
                    tensors[key] = _read_tensor(ref, key)
                else:
                    acc = None
                    for source, weight in zip(sources, weights):
                        tensor = _read_tensor(source, key)
                        acc_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
                        if acc is None:
                            acc = torch.zeros(tensor.shape, dtype=acc_dtype)
                        acc.add_(tensor.to(acc_dtype), alpha=float(weight))
                        out_dtype = tensor.dtype
                        del tensor
                    assert acc is not None  # at least one source (checked by the callers)
                    tensors[key] = acc.to(out_dtype)
                    del acc
                written += 1
                bar.update(1)
            metadata = dict(ref.file_metadata.get(name, {}))
            metadata.setdefault("format", "pt")
            save_file(tensors, str(out / name), metadata=metadata)
            del tensors
    if ref.kind == "sharded":
        shutil.copy2(ref.folder / INDEX_FILE, out / INDEX_FILE)
    return written


def _is_metadata_file(name: str) -> bool:
    if name in METADATA_NAMES:
        return True
    return any(fnmatch.fnmatch(name, pattern) for pattern in METADATA_PATTERNS)


def copy_metadata(out: Path, folders: Sequence[Path]) -> list[str]:
    """Copy configs, tokenizer and processor files into `out`, each from the first of `folders` that has it.

    Args:
        out (`Path`): The destination folder.
        folders (`Sequence[Path]`): Where to look, by priority (missing folders are skipped).

    Returns:
        `list[str]`: the names copied.
    """
    copied: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and _is_metadata_file(path.name) and path.name not in copied:
                if (out / path.name).exists():
                    continue
                shutil.copy2(path, out / path.name)
                copied.append(path.name)
    return copied

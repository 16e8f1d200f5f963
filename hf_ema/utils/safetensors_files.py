"""Safetensors files written in place, piece by piece, by several processes.

A safetensors file is an 8-byte little-endian header length, a JSON header (names, dtypes, shapes, byte offsets,
padded with spaces to a multiple of 8) and the row-major bytes of each tensor. The header follows from the names,
dtypes and shapes alone, so one process can write it and size the file while every process writes the byte range
of each tensor it holds (a contiguous range of the flattened tensor), straight to its final place.
[`file_layout`] builds exactly the bytes `safetensors.torch.save_file` writes for the same tensors (tensors sorted
by descending dtype, then by name; the metadata as given).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = [
    "FileLayout",
    "TensorSpec",
    "create_file",
    "dtype_from_name",
    "dtype_name",
    "file_layout",
    "read_elements",
    "parse_size",
    "read_header",
    "split_into_files",
    "write_elements",
]

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_BY_NAME = {code: dtype for dtype, code in _DTYPES.items()}

#: Elements are cast and written in chunks of at most this many bytes (bounds the extra memory of a save).
CHUNK_BYTES = 16 * 2**20


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.bfloat16` -> `"BF16"`).

    Args:
        dtype (`torch.dtype`): The dtype.
    """
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (`"BF16"` -> `torch.bfloat16`).

    Args:
        name (`str`): The safetensors dtype name.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {name!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a file, known before any byte of it exists.

    Args:
        key (`str`): Its name in the file.
        dtype (`torch.dtype`): Its dtype in the file.
        shape (`tuple[int, ...]`): Its full shape.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@cache
def _dtype_rank(codes: tuple[str, ...]) -> dict[str, int]:
    # The order safetensors sorts dtypes in (descending by its own dtype enum), read from the library itself:
    # one empty tensor per dtype, serialized, their order in the header.
    from safetensors.torch import save

    data = save({code: torch.empty(0, dtype=_BY_NAME[code]) for code in codes})
    (length,) = struct.unpack("<Q", data[:8])
    order = [k for k in json.loads(data[8 : 8 + length]) if k != "__metadata__"]
    return {code: i for i, code in enumerate(order)}


@dataclass(frozen=True)
class FileLayout:
    """Where each tensor of one safetensors file lives.

    Args:
        name (`str`): The file name.
        header (`bytes`): The first bytes of the file: the header length and the JSON header.
        offsets (`dict[str, int]`): Absolute byte offset in the file of each tensor's data.
        specs (`dict[str, TensorSpec]`): Each tensor, by key.
        size (`int`): The file size in bytes.
    """

    name: str
    header: bytes
    offsets: dict[str, int]
    specs: dict[str, TensorSpec]
    size: int


def file_layout(name: str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> FileLayout:
    """The layout of a safetensors file holding `specs`: byte for byte what `safetensors.torch.save_file` writes.

    Args:
        name (`str`): The file name.
        specs (`Sequence[TensorSpec]`): Its tensors (any order; the file sorts them).
        metadata (`dict[str, str]`, *optional*): The `__metadata__` entries, kept in this order.
    """
    codes = tuple(sorted({dtype_name(s.dtype) for s in specs}))
    rank = _dtype_rank(codes)
    ordered = sorted(specs, key=lambda s: (rank[dtype_name(s.dtype)], s.key))
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    begin = 0
    relative: dict[str, int] = {}
    for spec in ordered:
        end = begin + spec.nbytes
        header[spec.key] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape), "data_offsets": [begin, end]}
        relative[spec.key] = begin
        begin = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return FileLayout(
        name=name,
        header=struct.pack("<Q", len(text)) + text,
        offsets={k: start + v for k, v in relative.items()},
        specs={s.key: s for s in ordered},
        size=start + begin,
    )


_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes of a size written as `save_pretrained`'s `max_shard_size` is: an int, or a string like `"5GB"`
    (powers of 1000) or `"500MiB"` (powers of 1024).

    Args:
        size (`int` or `str`): The size.

    Raises:
        `ValueError`: not a positive size.
    """
    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None or (match.group(2) or "B").upper() not in _UNITS:
            raise ValueError(f"not a size: {size!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"not a positive size: {size!r}")
    return value


def split_into_files(
    specs: Sequence[TensorSpec], filename_pattern: str, max_shard_size: int | str
) -> list[tuple[str, list[TensorSpec]]]:
    """Group `specs`, in order, into files of at most `max_shard_size` bytes, as `save_pretrained` does
    (`huggingface_hub.split_state_dict_into_shards_factory`): one file named `filename_pattern.format(suffix="")`,
    or `...-00001-of-0000N...`.

    Args:
        specs (`Sequence[TensorSpec]`): The tensors, in the order they are assigned.
        filename_pattern (`str`): E.g. `"model{suffix}.safetensors"`.
        max_shard_size (`int` or `str`): E.g. `"5GB"` or a number of bytes (see [`parse_size`]).
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    by_key = {s.key: s for s in specs}
    split = split_state_dict_into_shards_factory(
        by_key,
        get_storage_size=lambda s: s.nbytes,
        get_storage_id=lambda s: None,
        filename_pattern=filename_pattern,
        max_shard_size=parse_size(max_shard_size),
    )
    return [(name, [by_key[k] for k in keys]) for name, keys in split.filename_to_tensors.items()]


def create_file(path: str | os.PathLike, layout: FileLayout) -> None:
    """Create `path` with the header of `layout`, sized to the whole file (the data is written later, in place).

    Args:
        path (`str` or `os.PathLike`): The file to create (it must not exist).
        layout (`FileLayout`): Its layout.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _pwrite_all(fd, layout.header, 0)
        os.ftruncate(fd, layout.size)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    # A CPU contiguous tensor's memory, whatever its dtype (numpy has no bfloat16: go through uint8).
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def write_elements(fd: int, offset: int, flat: torch.Tensor, dtype: torch.dtype) -> None:
    """Write the elements of `flat`, cast to `dtype`, at byte `offset` of an open file, in chunks.

    Args:
        fd (`int`): A file descriptor open for writing.
        offset (`int`): Where the first element goes.
        flat (`torch.Tensor`): A 1-D tensor (any device, any dtype).
        dtype (`torch.dtype`): The file's dtype for it.
    """
    flat = flat.detach().reshape(-1)
    if flat.numel() == 0:
        return
    size = torch.empty((), dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // max(size, flat.element_size()))
    for begin in range(0, flat.numel(), step):
        chunk = flat[begin : begin + step]
        if chunk.device.type != "cpu" or chunk.dtype != dtype or not chunk.is_contiguous():
            chunk = chunk.to("cpu", dtype=dtype).contiguous()
        _pwrite_all(fd, _as_bytes(chunk), offset + begin * size)


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict], dict[str, str]]:
    """The header of a safetensors file.

    Args:
        path (`str` or `os.PathLike`): The file.

    Returns:
        `tuple`: the byte offset where the data starts, `{key: {"dtype", "shape", "data_offsets"}}` and the
        metadata.

    Raises:
        `CheckpointError`: `path` is not a safetensors file (too short, a damaged or truncated header), named in
            the message.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"`{path}` is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise CheckpointError(f"`{path}` is not a safetensors file (header of {length} bytes)")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"`{path}` is corrupt: its safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for k, v in header.items() if k != "__metadata__"):
        raise CheckpointError(f"`{path}` is corrupt: its safetensors header is not a table of tensors")
    metadata = header.pop("__metadata__", None) or {}
    return 8 + length, header, metadata


def read_elements(
    path: str | os.PathLike, offset: int, numel: int, file_dtype: torch.dtype, out: torch.Tensor
) -> None:
    """Read `numel` elements of `file_dtype` at byte `offset` of `path` into the first `numel` elements of `out`
    (cast to its dtype, on its device), in chunks.

    Args:
        path (`str` or `os.PathLike`): The file.
        offset (`int`): Byte offset of the first element.
        numel (`int`): Number of elements.
        file_dtype (`torch.dtype`): Their dtype in the file.
        out (`torch.Tensor`): A contiguous tensor with at least `numel` elements.
    """
    flat = out.view(-1)
    size = torch.empty((), dtype=file_dtype).element_size()
    step = max(1, CHUNK_BYTES // size)
    direct = flat.device.type == "cpu" and flat.dtype == file_dtype
    with open(Path(path), "rb", buffering=0) as f:
        for begin in range(0, numel, step):
            count = min(step, numel - begin)
            target = flat[begin : begin + count] if direct else torch.empty(count, dtype=file_dtype)
            f.seek(offset + begin * size)
            view = _as_bytes(target)
            while view.nbytes:
                got = f.readinto(view)
                if not got:
                    raise CheckpointError(f"`{path}` is truncated: expected {count * size} more bytes at {offset}")
                view = view[got:]
            if not direct:
                flat[begin : begin + count].copy_(target)

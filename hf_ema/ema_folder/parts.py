"""Writing the parts: every rank writes its part of every tensor of the plan's files in place, then all ranks agree
that every part was written (or all stop)."""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError
from ..utils.safetensors_files import write_elements
from .plan import FilePart, PartEntry, SaveJob, SavePlan

__all__ = ["write_parts"]


def write_parts(job: SaveJob, plan: SavePlan, shared_filesystem: bool | None) -> None:
    """Every rank writes its part of every tensor of `plan` (a collective call); all raise if one failed.

    Without a filesystem that every rank sees (`shared_filesystem=False`, or detected when `None`), each rank sends
    its part to the main process, which writes it: the main process then holds one rank's part of one tensor at a
    time.

    Args:
        job (`SaveJob`): The save.
        plan (`SavePlan`): The files to write.
        shared_filesystem (`bool`, *optional*): Whether every rank sees the folder's filesystem.
    """
    ranks = job.ranks
    shared = shared_filesystem
    if shared is None:
        first = plan.files[0].name if plan.files else None
        shared = ranks.all_true(first is None or (job.folder / first).is_file())
    error = None
    try:
        _write_files(job, plan.files, shared)
    except Exception as err:
        error = err
    if not ranks.all_true(error is None):  # every rank learns that the folder is incomplete
        if error is not None:
            raise error
        raise CheckpointError(f"another rank failed to write its part of `{job.output_dir}`; see its error")


def _part_table(job: SaveJob, files: tuple[FilePart, ...]) -> torch.Tensor | None:
    """`(world_size, entries, 3)`: every rank's `(start, numel, write)` of each entry, for the main process to
    receive the parts of the others."""
    rows = []
    for f in files:
        for entry in f.entries:
            piece = job.sources.piece(entry.source)
            rows.append([-1 if piece.start is None else piece.start, piece.numel, int(piece.write)])
    return job.ranks.all_gather_rows(rows) if rows else None


def _write_files(job: SaveJob, files: tuple[FilePart, ...], shared: bool) -> None:
    ranks = job.ranks
    table = None if shared else _part_table(job, files)
    row = 0
    for f in files:
        fd = os.open(job.folder / f.name, os.O_WRONLY) if (shared or ranks.main) else None
        try:
            for entry in f.entries:
                _write_entry(job, fd, entry, shared, None if table is None else table[:, row])
                row += 1
            if fd is not None:
                os.fsync(fd)
        finally:
            if fd is not None:
                os.close(fd)


def _write_entry(job: SaveJob, fd: int | None, entry: PartEntry, shared: bool, rows: torch.Tensor | None) -> None:
    """This rank's part of one tensor: written in place, sent to the main process, or (not one contiguous range of
    the tensor, e.g. a DTensor sharded on another dim) gathered and written by the main process."""
    ranks = job.ranks
    dtype = entry.torch_dtype
    size = torch.empty((), dtype=dtype).element_size()
    piece = job.sources.piece(entry.source)
    if piece.start is None:
        full = job.sources.full(entry.source)
        if ranks.main:
            assert fd is not None and full is not None  # the main process opens the files, gets the tensor
            write_elements(fd, entry.offset, full.reshape(-1), dtype)
        return
    local, _ = job.sources.local(entry.source)
    mine = local.reshape(-1)[: piece.numel]
    writes = bool(piece.write and piece.numel)
    if writes and (shared or ranks.main):
        assert fd is not None  # opened wherever a part is written
        write_elements(fd, entry.offset + piece.start * size, mine, dtype)
    if shared:
        return
    if ranks.main:
        assert fd is not None and rows is not None  # gathered whenever a part goes through the main process
        _receive_parts(job, fd, entry.offset, size, rows)
    elif writes:
        ranks.send_to_main(mine.to(dtype).contiguous().view(torch.uint8))


def _receive_parts(job: SaveJob, fd: int, offset: int, size: int, rows: torch.Tensor) -> None:
    # rows[r] = (start, numel, write) of rank r's part of this tensor.
    ranks = job.ranks
    for r in range(ranks.world_size):
        start, numel, write = (int(v) for v in rows[r])
        if r == ranks.rank or not (write and numel):
            continue
        buf = ranks.receive_from(r, numel * size)
        write_elements(fd, offset + start * size, buf, torch.uint8)
        del buf

"""Every collective hf-ema makes over `torch.distributed`, in one place: the "do all ranks agree" check (and its
device-side form, `reduce_max_`), sums of a few scalars, the gathers of sharded tensors, and the steps of a save or
load that only the main process does (its result or its error handed to every rank), with their messages and parts.

Outside `torch.distributed` (or with one rank) each of them is the identity, so callers need no branch for it. The
other modules of hf-ema call no `torch.distributed` collective themselves (DTensor's `full_tensor()` aside: the
DDP-sharded layout gathers its chunks through DTensor).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch

from ..compat.torch import all_gather_flat, current_accelerator_device
from ..errors import CheckpointError

__all__ = [
    "Ranks",
    "all_gather_object",
    "all_ranks_agree",
    "all_reduce_sum",
    "barrier",
    "comm_device",
    "dist_ready",
    "gather_concat",
    "new_cpu_group",
    "reduce_max_",
]

T = TypeVar("T")


def dist_ready() -> bool:
    """Whether `torch.distributed` is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def comm_device(group: torch.distributed.ProcessGroup | None = None) -> torch.device:
    """The device collectives of `group` run on: the current accelerator for NCCL-like backends, else CPU.

    EMA shards offloaded to CPU (`device="cpu"`) are moved there for the duration of one collective.

    Args:
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).
    """
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend) or "hccl" in str(backend) or "xccl" in str(backend):
        device = current_accelerator_device()
        if device is not None:
            return device
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op outside `torch.distributed`)."""
    if dist_ready():
        torch.distributed.barrier()


def new_cpu_group() -> torch.distributed.ProcessGroup:
    """A gloo process group of every rank (a collective call): for collectives of a background thread, which must
    not interleave with the training's on the default group."""
    return torch.distributed.new_group(backend="gloo")


# ---------------------------------------------------------------------------------------------------- agreement
def all_ranks_agree(
    flag: bool, group: torch.distributed.ProcessGroup | None = None, device: torch.device | None = None
) -> bool:
    """Whether `flag` is true on every rank of `group` (one all-reduce of a flag; `flag` itself outside
    `torch.distributed`). A collective call: every rank of the group makes it. It reads the result on the host:
    see [`reduce_max_`] for a check that stays on the device.

    Args:
        flag (`bool`): This rank's answer.
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).
        device (`torch.device`, *optional*): Where the flag is reduced; the group's communication device when
            `None`.
    """
    if not dist_ready():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device or comm_device(group))
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(value.item())


def reduce_max_(tensor: torch.Tensor, group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """In place: the element-wise maximum of `tensor` over the ranks of `group` (an all-reduce; the identity outside
    `torch.distributed`). The device form of the agreement: with a flag tensor that is 1 where a rank found a
    problem, every rank ends with 1 if any did, and nothing is read on the host, so no stream synchronises.

    A collective call: every rank of the group makes it, with a tensor of the same shape and dtype. The tensor
    should live on the group's communication device (`comm_device(group)`: the GPU under NCCL); elsewhere it is
    reduced through a copy there and written back.

    Args:
        tensor (`torch.Tensor`): This rank's values, overwritten with the maximum.
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).

    Returns:
        `torch.Tensor`: `tensor` itself.
    """
    if not dist_ready():
        return tensor
    device = comm_device(group)
    if tensor.device == device:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
        return tensor
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.MAX, group=group)
    return tensor.copy_(moved)


# ---------------------------------------------------------------------------------------------------- sums, gathers
def all_reduce_sum(values: Sequence[float], reduce: bool | None = None) -> list[float]:
    """Sum a few scalars across ranks (identity outside `torch.distributed`). A collective call when it reduces.

    Args:
        values (`Sequence[float]`): This rank's values.
        reduce (`bool`, *optional*): Force (`True`) or skip (`False`) the reduction; by default reduce when a process
            group is initialised.

    Returns:
        `list[float]`: the sums over ranks.
    """
    if reduce is None:
        reduce = dist_ready()
    if not reduce:
        return [float(v) for v in values]
    # NCCL reduces accelerator tensors only; gloo takes CPU tensors.
    buf = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (`[obj]` outside `torch.distributed`). A collective call.

    Args:
        obj (`Any`): This rank's object.
    """
    if not dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_concat(
    local: torch.Tensor, group: torch.distributed.ProcessGroup | None = None, all_ranks: bool = False
) -> torch.Tensor | None:
    """Every rank's flat `local` (the same number of elements on every rank), concatenated in the group's rank
    order: on the group's first rank, or on every rank with `all_ranks`; `None` elsewhere. A collective call over
    `group`, on its communication device.

    Args:
        local (`torch.Tensor`): This rank's piece.
        group (`ProcessGroup`, *optional*): The process group (the default group when `None`).
        all_ranks (`bool`, *optional*, defaults to `False`): Return the result on every rank.
    """
    device = comm_device(group)
    local = local.reshape(-1).to(device)
    world = torch.distributed.get_world_size(group)
    if all_ranks:
        flat = torch.empty(world * local.numel(), dtype=local.dtype, device=device)
        all_gather_flat(flat, local, group=group)
        return flat
    dst = torch.distributed.get_global_rank(
        cast(torch.distributed.ProcessGroup, group or torch.distributed.group.WORLD), 0
    )
    parts = [torch.empty_like(local) for _ in range(world)] if torch.distributed.get_rank() == dst else None
    torch.distributed.gather(local, parts, dst=dst, group=group)
    return None if parts is None else torch.cat(parts)


# ---------------------------------------------------------------------------------------------------- a save's ranks
class _Topology(Protocol):
    """What `Ranks` reads of a layout."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def is_main_process(self) -> bool: ...


class Ranks:
    """The ranks that save or load one EMA together (no-ops in a single process); messages are JSON.

    Args:
        layout (`ShardLayout`): The EMA's layout (rank, world size, main process).
    """

    def __init__(self, layout: _Topology) -> None:
        self.active = dist_ready() and layout.world_size > 1
        self.main = layout.is_main_process()
        self.rank = layout.rank
        self.world_size = layout.world_size
        self.device = comm_device() if self.active else torch.device("cpu")

    def broadcast(self, message: Any = None) -> Any:
        """The main process's JSON-serialisable `message`, on every rank.

        Args:
            message (`Any`, *optional*): The message (read on the main process only).
        """
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
        """Whether `flag` is true on every rank.

        Args:
            flag (`bool`): This rank's answer.
        """
        if not self.active:
            return bool(flag)
        return all_ranks_agree(flag, device=self.device)

    def on_main(self, what: str, step: Callable[[], T]) -> T:
        """Run `step` on the main process and hand its JSON-serialisable result to every rank. If it fails, every
        rank raises: the main process its own error, the others a `CheckpointError` quoting it.

        Args:
            what (`str`): What the step does, for the other ranks' error ("write `out/ema`").
            step (`Callable`): The step (called on the main process only).
        """
        if self.main:
            try:
                result = step()
            except BaseException as err:
                self.broadcast({"error": f"{type(err).__name__}: {err}"})
                raise
            self.broadcast({"result": result})
            return result
        message = self.broadcast()
        if "error" in message:
            raise CheckpointError(f"the main process failed to {what}: {message['error']}")
        return message["result"]

    def all_gather_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Every rank's `rows` (as many on every rank): a `(world_size, len(rows), width)` int64 tensor.

        Args:
            rows (`list[list[int]]`): This rank's rows, each of the same width.
        """
        mine = torch.tensor(rows, dtype=torch.int64)
        if not self.active:
            return mine.unsqueeze(0)
        mine = mine.to(self.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, mine)
        return torch.stack([t.cpu() for t in out])

    def send_to_main(self, data: torch.Tensor) -> None:
        """Send `data` (bytes: a `uint8` tensor) to the main process, which receives it with `receive_from`.

        Args:
            data (`torch.Tensor`): A contiguous `uint8` tensor.
        """
        torch.distributed.send(data.to(self.device), dst=0)

    def receive_from(self, rank: int, nbytes: int) -> torch.Tensor:
        """On the main process: the `nbytes` bytes that `rank` sends with `send_to_main`.

        Args:
            rank (`int`): The sending rank.
            nbytes (`int`): How many bytes it sends.
        """
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        torch.distributed.recv(buf, src=rank)
        return buf

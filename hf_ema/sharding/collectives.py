"""Every collective hf-ema makes over `torch.distributed`: the "do all ranks agree" check, the steps only the main
process does (its result or its error handed to every rank), and the messages, parts and gathers of a save.

Outside `torch.distributed` (or with one rank) each of them is the identity, so callers need no branch for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import CheckpointError
from .base import comm_device, dist_ready

if TYPE_CHECKING:
    from .base import ShardLayout

__all__ = ["Ranks", "all_ranks_agree"]

T = TypeVar("T")


def all_ranks_agree(
    flag: bool, group: torch.distributed.ProcessGroup | None = None, device: torch.device | None = None
) -> bool:
    """Whether `flag` is true on every rank of `group` (one all-reduce of a flag; `flag` itself outside
    `torch.distributed`). A collective call: every rank of the group makes it.

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


class Ranks:
    """The ranks that save or load one EMA together (no-ops in a single process); messages are JSON.

    Args:
        layout (`ShardLayout`): The EMA's layout (rank, world size, main process).
    """

    def __init__(self, layout: ShardLayout) -> None:
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

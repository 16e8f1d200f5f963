"""The GPU update: every group folded by the Triton kernel, the skip of a non-finite step decided on the device.

[`DeviceUpdate`] runs one EMA update (or copy) of all on-device groups without a host synchronisation, whatever
`EMAConfig.on_nonfinite` says:

1. the flags (int32, on the device) are reset;
2. `CHECK`: a read-only pass, only when this update must be checked before it is written (its interpolation weight
   is above `MAX_UNDO_WEIGHT`, or the previous update was skipped: a device-side flag); otherwise each program
   returns at once;
3. the ranks of a sharded EMA agree (an all-reduce of the flags, queued on the stream like any kernel);
4. `UPDATE` with the check fused (or `COPY`), skipped entirely when step 2 found a NaN/inf on any rank;
5. the ranks agree again; `UNDO` restores the EMA where step 4 wrote an update that step 4 found non-finite here or
   on another rank (else each program returns at once).

The outcome is copied into a small pinned host buffer with a non-blocking copy and an event, and read on the host
only when that event has completed (`poll()`, at the next update) or when the EMA is read (`wait()`): skip counts,
warnings and `on_nonfinite="raise"` arrive then, never by stalling the update. Without the check (`"ignore"`) an
update is one `UPDATE` launch per group.

Everything here is launched from tables built once (and rebuilt when a tensor's storage moves), so the number of
launches does not depend on the number of tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .nonfinite import FoldOutcome

__all__ = ["DeviceUpdate", "KERNEL_ENV", "TritonGroup", "triton_eligible"]

logger = logging.getLogger(__name__)

#: Environment variable choosing the update kernel: `auto` (default: Triton for CUDA groups when it is installed,
#: else the eager kernels), `triton` (also on CPU tensors when `TRITON_INTERPRET=1`, as the tests do), or `eager`.
KERNEL_ENV = "HF_EMA_KERNEL"
#: Elements per block of the update; `HF_EMA_TRITON_BLOCK` / `HF_EMA_TRITON_WARPS` override them (benchmarks).
DEFAULT_BLOCK = 4096
DEFAULT_WARPS = 8
#: Programs of the launches that usually have nothing to do (`CHECK`, `UNDO`): each loops over blocks, so few
#: programs cover any size, and an idle launch costs a few microseconds.
GATED_PROGRAMS = 1024
#: Host buffers for outcomes made up front (more are made when more updates are in flight at once).
SPARE_HOST_FLAGS = 4
#: `FIRST` slot value when no tensor held a non-finite weight.
_NO_TENSOR = 2**31 - 1
_BITS_AND_EXP = {
    torch.float32: ("int32", 0x7F800000, 4),
    torch.bfloat16: ("int16", 0x7F80, 8),
    torch.float16: ("int16", 0x7C00, 8),
}


def kernel_choice() -> str:
    """The `HF_EMA_KERNEL` setting: `auto`, `triton` or `eager`."""
    value = os.environ.get(KERNEL_ENV, "auto").strip().lower()
    return value if value in ("auto", "triton", "eager") else "auto"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_eligible(groups: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]) -> str | None:
    """Why these `(ema, live)` groups cannot take the Triton update, or `None` when they can.

    They can when every EMA tensor is fp32, every weight fp32, bf16 or fp16, all tensors contiguous and on one
    device, that device is CUDA (or the CPU under `TRITON_INTERPRET=1`), and Triton is installed.

    Args:
        groups (`Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]`): The `(ema, live)` groups.
    """
    pairs = [(e, w) for ema, live in groups for e, w in zip(ema, live)]
    if not pairs:
        return "no tensors"
    device = pairs[0][0].device
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _interpreting()):
        return f"tensors on {device} (CUDA needed, or TRITON_INTERPRET=1 on the CPU)"
    for e, w in pairs:
        if e.device != device or w.device != device:
            return "tensors on several devices"
        if e.dtype != torch.float32 or w.dtype not in _BITS_AND_EXP:
            return f"EMA {e.dtype} / weights {w.dtype} (fp32 EMA of fp32, bf16 or fp16 weights needed)"
        if not (e.is_contiguous() and w.is_contiguous()) or e.shape != w.shape:
            return "a non-contiguous tensor"
    if not _triton_importable():
        return "triton is not installed"
    return None


def _device_table(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Pinned and non_blocking: building a table never synchronises the host with the device.
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


@dataclass
class _Part:
    """The launch table of the tensors of a group that share one alignment class."""

    ema_base: torch.Tensor
    live_base: torch.Tensor
    tables: tuple[torch.Tensor, ...]  # ema offsets, live offsets, numels, block -> tensor, block -> start
    n_blocks: int
    tensor_base: int  # global index of the part's first tensor (for `FIRST`)
    aligned: bool


class TritonGroup:
    """The Triton launches for one group: fp32 EMA tensors and weights of one dtype, on one device.

    Args:
        ema (`list[torch.Tensor]`): Contiguous fp32 EMA tensors.
        live (`list[torch.Tensor]`): Contiguous weights (fp32, bf16 or fp16), same shapes; read at every call, so
            they must keep their storage (the tables are rebuilt when it moves).
        first_index (`int`, *optional*, defaults to 0): Index of the group's first tensor among all tensors of the
            update (reported by the `FIRST` flag).
        block (`int`, *optional*): Elements per block (a power of two); defaults to `HF_EMA_TRITON_BLOCK` or 4096.
    """

    def __init__(
        self, ema: list[torch.Tensor], live: list[torch.Tensor], first_index: int = 0, block: int | None = None
    ) -> None:
        self.ema, self.live = list(ema), list(live)
        self.first_index = first_index
        self.device = self.ema[0].device
        self.block = block or int(os.environ.get("HF_EMA_TRITON_BLOCK", DEFAULT_BLOCK))
        self.num_warps = int(os.environ.get("HF_EMA_TRITON_WARPS", DEFAULT_WARPS))
        bits, exp, live_align = _BITS_AND_EXP[self.live[0].dtype]
        self._bits_name, self._exp, self._live_align = bits, exp, live_align
        self._ptrs: list[int] = []
        self._parts: list[_Part] = []
        self._plan()

    def _current_ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.ema] + [t.data_ptr() for t in self.live]

    def _plan(self) -> None:
        ptrs = self._current_ptrs()
        n = len(self.ema)
        aligned = [i for i in range(n) if ptrs[i] % 16 == 0 and ptrs[n + i] % 16 == 0]
        rest = [i for i in range(n) if ptrs[i] % 16 or ptrs[n + i] % 16]
        #: The group's tensor indices in launch order: global index `first_index + k` is tensor `order[k]`.
        self.order = aligned + rest
        self._parts = []
        if aligned:
            self._parts.append(self._part(aligned, ptrs, True, self.first_index))
        if rest:
            self._parts.append(self._part(rest, ptrs, False, self.first_index + len(aligned)))
        self._ptrs = ptrs

    def _part(self, indices: list[int], ptrs: list[int], aligned: bool, tensor_base: int) -> _Part:
        n, item = len(self.ema), self.live[0].element_size()
        first = indices[0]
        # Element offsets from the part's first tensor (any sign): its storage is the kernel's base pointer.
        ema_off = [(ptrs[i] - ptrs[first]) // 4 for i in indices]
        live_off = [(ptrs[n + i] - ptrs[n + first]) // item for i in indices]
        numels = [self.ema[i].numel() for i in indices]
        block_tensor, block_start = [], []
        for j, numel in enumerate(numels):
            for start in range(0, numel, self.block):
                block_tensor.append(j)
                block_start.append(start)
        dev = self.device
        tables = (
            _device_table(ema_off, torch.int64, dev),
            _device_table(live_off, torch.int64, dev),
            _device_table(numels, torch.int64, dev),
            _device_table(block_tensor or [0], torch.int32, dev),
            _device_table(block_start or [0], torch.int64, dev),
        )
        return _Part(self.ema[first], self.live[first], tables, len(block_tensor), tensor_base, aligned)

    def refresh(self) -> None:
        """Rebuild the tables when a tensor's storage moved (e.g. `model.to()`): the kernel must never write through
        a stale pointer. Called once per update, before its launches."""
        if self._current_ptrs() != self._ptrs:
            self._plan()

    def locate(self, index: int) -> int:
        """The group's tensor index of global tensor index `index` (as reported by the `FIRST` flag).

        Args:
            index (`int`): A global index in `[first_index, first_index + len(ema))`.
        """
        return self.order[index - self.first_index]

    def launch(self, mode: int, flags: torch.Tensor, prev: torch.Tensor, force: int, weight: float, checked: bool):
        """Queue one launch per part in `mode` (see `hf_ema.engine.triton_kernels`).

        Args:
            mode (`int`): `UPDATE`, `CHECK`, `COPY` or `UNDO`.
            flags (`torch.Tensor`): The int32 flags of this update (3 elements, on the device).
            prev (`torch.Tensor`): Device flag, non-zero when the previous update was skipped.
            force (`int`): 1 to make `CHECK` run whatever `prev` says.
            weight (`float`): The interpolation weight `1 - beta`.
            checked (`bool`): Whether `UPDATE` / `COPY` test the weights (and are gated on `PRE`).
        """
        from .triton_kernels import CHECK, UNDO, kernel, tl

        jitted = kernel()
        bits = getattr(tl, self._bits_name)
        for part in self._parts:
            if part.n_blocks == 0:
                continue
            gated = mode in (CHECK, UNDO)
            grid = (min(part.n_blocks, GATED_PROGRAMS) if gated else part.n_blocks,)
            jitted[grid](
                part.ema_base,
                part.live_base,
                *part.tables,
                part.n_blocks,
                flags,
                prev,
                force,
                float(weight),
                part.tensor_base,
                MODE=mode,
                CHECKED=checked,
                ALIGNED=part.aligned,
                LIVE_ALIGN=self._live_align,
                BLOCK=self.block,
                BITS=bits,
                EXP=self._exp,
                num_warps=self.num_warps,
            )


@dataclass
class _HostFlags:
    """A host copy of the flags: a pinned tensor (the target of the non-blocking copy) and a NumPy view of the
    same memory, which the host reads once the copy's event has completed (reading it is no tensor operation)."""

    tensor: torch.Tensor
    view: Any  # numpy.ndarray


@dataclass
class _Pending:
    """The outcome of one checked update, on its way to the host."""

    step: int
    host: _HostFlags
    event: Any  # CUDA event recorded after the copy; None on the CPU (the copy is done at once)

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())


class DeviceUpdate:
    """The update of every on-device group with the Triton kernel, the non-finite check and its skip decided on the
    device (see the module docstring).

    Args:
        groups (`Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]`): `(ema, live)` groups, all eligible
            (see [`triton_eligible`]).
        group_ids (`Sequence[int]`): The caller's index of each group (reported in `FoldOutcome.bad`).
        check (`bool`): Test the weights for NaN/inf and skip the update when one is (`on_nonfinite != "ignore"`).
        reduce (`Callable[[torch.Tensor], object]`, *optional*): In-place MAX all-reduce of a device int32 tensor over
            the ranks that share the EMA (a sharded EMA); `None` on one rank or for a replicated EMA.
        block (`int`, *optional*): Elements per block (tests use small blocks).
    """

    def __init__(
        self,
        groups: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
        group_ids: Sequence[int],
        check: bool,
        reduce: Callable[[torch.Tensor], object] | None = None,
        block: int | None = None,
    ) -> None:
        from .triton_kernels import CHECK, COPY, UNDO, UPDATE

        self._modes = (UPDATE, CHECK, COPY, UNDO)
        self.check = check
        self.reduce = reduce
        self.parts: list[TritonGroup] = []
        self.group_ids = list(group_ids)
        first = 0
        for ema, live in groups:
            self.parts.append(TritonGroup(ema, live, first_index=first, block=block))
            first += len(ema)
        self.device = self.parts[0].device
        self._init = _device_table([0, 0, _NO_TENSOR], torch.int32, self.device)
        self.flags = self._init.clone()
        self.prev = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._pending: deque[_Pending] = deque()
        # A few host buffers made now, so that an update allocates none while the outcomes keep up.
        self._spare: list[_HostFlags] = [self._host_flags() for _ in range(SPARE_HOST_FLAGS)]

    # ------------------------------------------------------------------ launches
    def _each(self, mode: int, force: int, weight: float, checked: bool) -> None:
        for part in self.parts:
            part.launch(mode, self.flags, self.prev, force, weight, checked)

    def _agree(self) -> None:
        if self.reduce is not None:
            self.reduce(self.flags[:2])  # PRE and FUSED; FIRST stays this rank's own

    def fold(self, weight: float, step: int, force_check: bool = False) -> None:
        """Queue one update with interpolation weight `weight`; its outcome comes from `poll()` / `wait()`.

        Args:
            weight (`float`): `1 - beta`.
            step (`int`): The optimizer step (reported in the outcome).
            force_check (`bool`, *optional*, defaults to `False`): Check the weights before writing (an update
                that cannot be undone precisely: `weight > MAX_UNDO_WEIGHT`).
        """
        update, check, _, undo = self._modes
        for part in self.parts:
            part.refresh()
        if not self.check:
            self._each(update, 0, weight, checked=False)
            return
        self.flags.copy_(self._init)
        self._each(check, int(force_check), weight, checked=True)
        self._agree()
        self._each(update, 0, weight, checked=True)
        self._agree()
        self._each(undo, 0, weight, checked=True)
        torch.maximum(self.flags[0:1], self.flags[1:2], out=self.prev)  # the next update checks first after a skip
        self._queue(step)

    def copy(self, step: int) -> None:
        """Queue a copy of the weights into the EMA (checked first when `check`, and skipped on a NaN/inf).

        Args:
            step (`int`): The optimizer step (reported in the outcome).
        """
        _, check, copy, _ = self._modes
        for part in self.parts:
            part.refresh()
        if not self.check:
            self._each(copy, 0, 1.0, checked=False)
            return
        self.flags.copy_(self._init)
        self._each(check, 1, 1.0, checked=True)
        self._agree()
        self._each(copy, 0, 1.0, checked=True)
        self.prev.copy_(self.flags[0:1])
        self._queue(step)

    def _host_flags(self) -> _HostFlags:
        tensor = torch.empty(3, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        return _HostFlags(tensor, tensor.numpy())

    def _queue(self, step: int) -> None:
        host = self._spare.pop() if self._spare else self._host_flags()
        host.tensor.copy_(self.flags, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_Pending(step, host, event))

    # ------------------------------------------------------------------ outcomes
    def _outcome(self, pending: _Pending) -> FoldOutcome:
        pre, fused, first = (int(v) for v in pending.host.view)
        self._spare.append(pending.host)
        if not (pre or fused):
            return FoldOutcome(pending.step, True, deferred=True)
        return FoldOutcome(pending.step, False, self._locate(first), deferred=True)

    def _locate(self, index: int) -> tuple[int, int] | None:
        # `FIRST` is this rank's own: none when the non-finite weight was on another rank.
        for gid, part in zip(self.group_ids, self.parts):
            if part.first_index <= index < part.first_index + len(part.ema):
                return gid, part.locate(index)
        return None

    def poll(self) -> list[FoldOutcome]:
        """The outcomes whose flags have reached the host, oldest first (never blocks)."""
        out = []
        while self._pending and self._pending[0].ready():
            out.append(self._outcome(self._pending.popleft()))
        return out

    def wait(self) -> list[FoldOutcome]:
        """Every outcome still on its way, oldest first (blocks on the device until they are there)."""
        out = []
        while self._pending:
            pending = self._pending.popleft()
            if pending.event is not None:
                pending.event.synchronize()
            out.append(self._outcome(pending))
        return out

    @property
    def has_pending(self) -> bool:
        """Whether outcomes are still on their way to the host."""
        return bool(self._pending)


def launch_context(side: Any) -> contextlib.AbstractContextManager:
    """`side.launch()` for a side stream, else a no-op context."""
    return side.launch() if side is not None else contextlib.nullcontext()

"""Routes each group of EMA tensors to its update path: the Triton kernel on the GPU ([`DeviceUpdate`]), an eager
on-device kernel (optionally on a CUDA side stream) or offloaded to the CPU (optionally in a background thread).
`ModelEMA` owns one [`EMAUpdater`].

With `EMAConfig(on_nonfinite="skip" | "raise")` every update and every copy is made only when every weight it reads
is finite (on every rank, given an agreement): decided on the device by [`DeviceUpdate`], or on the host by a
[`NonFiniteGuard`]. Its [`FoldOutcome`] goes to `on_outcome`: at once for a host-checked update; for an update
decided on the device or running in the background (`defers_outcomes`), at a later `poll()` (once it is known,
without blocking) or `wait()`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from ..config import EMAConfig
from .device import DeviceUpdate, kernel_choice, launch_context, triton_eligible
from .kernels import MAX_UNDO_WEIGHT, LerpKernel, copy_
from .nonfinite import Agreement, FoldOutcome, NonFiniteGuard
from .offload import OffloadedUpdate
from .streams import SideStream, register_pre_step_guard

__all__ = ["EMAUpdater"]

logger = logging.getLogger(__name__)

#: In-place MAX all-reduce of a small device int32 tensor over the ranks of a sharded EMA (never read on the host).
DeviceReduce = Callable[[torch.Tensor], object]


class EMAUpdater:
    """The update of a set of `(ema, live)` tensor groups, following the config's `device`, `async_update` and
    `cuda_stream`.

    Args:
        groups (`Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]`): `(ema, live)` tensor lists, each list on
            one device with one dtype.
        config (`EMAConfig`): The EMA configuration.
        backend (`str`, *optional*, defaults to `"auto"`): Kernel choice, see [`LerpKernel`].
        agree (`Agreement`, *optional*): The cross-rank agreement of the non-finite check (see `set_agreement`).
    """

    def __init__(
        self,
        groups: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
        config: EMAConfig,
        backend: str = "auto",
        agree: Agreement | None = None,
    ) -> None:
        self.check = config.on_nonfinite != "ignore"
        #: Called with the `FoldOutcome` of every checked update or copy (the owner counts, warns or raises).
        self.on_outcome: Callable[[FoldOutcome], None] | None = None
        indexed = [(gid, list(e), list(w)) for gid, (e, w) in enumerate(groups) if e]
        groups = [(e, w) for _, e, w in indexed]
        offloaded_from_accelerator = any(e[0].device.type == "cpu" and w[0].device.type != "cpu" for e, w in groups)
        async_update = config.async_update
        if async_update is None:
            async_update = config.device == "cpu" and offloaded_from_accelerator

        def is_offloaded(ema: list[torch.Tensor], live: list[torch.Tensor]) -> bool:
            if ema[0].device.type != "cpu":
                return False
            return live[0].device.type != "cpu" or bool(async_update)

        self.sides: dict[torch.device, SideStream] = {}
        for ema, live in groups:
            # The device-to-host copy of an offloaded EMA always runs on a side stream: on the current stream the
            # next forward would wait for it.
            wants_side = config.cuda_stream or is_offloaded(ema, live)
            if wants_side and live[0].is_cuda and live[0].device not in self.sides:
                self.sides[live[0].device] = SideStream(live[0].device)
        self.on_device: list[tuple[LerpKernel, SideStream | None]] = []
        offloaded, on_device_ids, offloaded_ids = [], [], []
        side_for_offload = None
        device_groups = []
        for gid, ema, live in indexed:
            if is_offloaded(ema, live):
                offloaded.append((ema, live))
                offloaded_ids.append(gid)
                side_for_offload = side_for_offload or self.sides.get(live[0].device)
            else:
                device_groups.append((gid, ema, live))
        #: The GPU update of every on-device group (Triton), or None (eager kernels, below).
        self.device_update = self._device_update(device_groups, backend, bool(offloaded))
        self._device_side = self.sides.get(self.device_update.device) if self.device_update is not None else None
        if self.device_update is None:
            for gid, ema, live in device_groups:
                kernel = LerpKernel(ema, live, backend=backend, check_finite=self.check)
                self.on_device.append((kernel, self.sides.get(live[0].device)))
                on_device_ids.append(gid)
        self.offload = (
            OffloadedUpdate(
                offloaded,
                async_update=bool(async_update),
                side_stream=side_for_offload,
                backend=backend,
                check_finite=self.check,
            )
            if offloaded
            else None
        )
        #: Whether updates run in the background thread (then every group is offloaded: `async_update` needs
        #: `device="cpu"`, and every EMA tensor is on the CPU).
        self.in_background = self.offload is not None and self.offload.async_update
        self._side_of = {id(kernel): side for kernel, side in self.on_device}
        self._guard: NonFiniteGuard | None = None
        if self.check and self.device_update is None:
            kernels = [kernel for kernel, _ in self.on_device] + (self.offload.kernels if self.offload else [])
            self._guard = NonFiniteGuard(kernels, on_device_ids + offloaded_ids, agree)
            if self.in_background and self.offload is not None:  # in the background means offloaded
                self.offload.guard = self._guard
        # With a side stream, the next optimizer step must not overwrite weights the update still reads.
        self._remove_guard = register_pre_step_guard(self) if self.sides else None

    def _device_update(self, device_groups: list, backend: str, has_offload: bool) -> DeviceUpdate | None:
        """The Triton update of the on-device groups when they can take it (`HF_EMA_KERNEL`: `auto` for CUDA
        groups, `triton` also for CPU tensors under `TRITON_INTERPRET=1`), else None."""
        choice = kernel_choice()
        if not device_groups or backend != "auto" or choice == "eager":
            return None
        groups = [(ema, live) for _, ema, live in device_groups]
        why = "an offloaded group beside it" if has_offload else triton_eligible(groups)
        if why is None and (choice == "triton" or groups[0][0][0].is_cuda):
            return DeviceUpdate(groups, [gid for gid, _, _ in device_groups], check=self.check)
        if choice == "triton" or (why == "triton is not installed" and groups[0][0][0].is_cuda):
            logger.info("hf-ema: the Triton update is not used (%s); using the eager kernels", why)
        return None

    @property
    def defers_outcomes(self) -> bool:
        """Whether the outcome of a checked update arrives after `fold()` returns (decided on the device, or folded
        in the background): it then comes through `on_outcome` at a later `poll()` or `wait()`."""
        return self.check and (self.device_update is not None or self.in_background)

    @property
    def busy(self) -> bool:
        """Whether an offloaded update is still being folded in the background (a new one would have to wait)."""
        return self.in_background and self.offload is not None and self.offload.in_flight

    @property
    def kernels(self) -> list[LerpKernel]:
        """Every kernel in use (on-device and offloaded), e.g. to inspect the chosen `backend`."""
        out = [kernel for kernel, _ in self.on_device]
        if self.offload is not None:
            out += self.offload.kernels
        return out

    def set_agreement(self, agree: Agreement | None) -> None:
        """Set the cross-rank agreement of the non-finite check: `agree(local_ok)` returns whether every rank's
        weights are finite, a collective that every rank reaches at the same update. With updates in the
        background it is called from the update thread, so it must use a process group of its own.

        Args:
            agree (`Agreement`, *optional*): The agreement, or `None` (one rank, or a replicated EMA).
        """
        if self._guard is not None:
            self._guard.agree = agree

    def set_device_reduce(self, reduce: DeviceReduce | None) -> None:
        """Set the cross-rank agreement of the device-side check (the Triton update of a sharded EMA): an in-place
        MAX all-reduce of the device flags, queued on the stream, never read on the host.

        Args:
            reduce (`Callable[[torch.Tensor], object]`, *optional*): The all-reduce, or `None`.
        """
        if self.device_update is not None:
            self.device_update.reduce = reduce

    def _deliver(self, outcome: FoldOutcome | None) -> None:
        if outcome is not None and self.on_outcome is not None:
            self.on_outcome(outcome)

    def _run_kernel(self, kernel: LerpKernel, weight: float) -> None:
        side = self._side_of.get(id(kernel))
        if side is None:
            kernel(weight)
        else:
            with side.launch():
                kernel(weight)

    def fold(self, weight: float, step: int = 0) -> FoldOutcome | None:
        """One EMA update with interpolation weight `weight` (`1 - beta`).

        Args:
            weight (`float`): The interpolation weight.
            step (`int`, *optional*, defaults to 0): The optimizer step, reported in the outcome.

        Returns:
            `FoldOutcome` or `None`: the outcome of a checked update made now (also passed to `on_outcome`);
            `None` without the check, or when the update runs in the background (its outcome is delivered at the
            next `wait()`).
        """
        if self.device_update is not None:
            with launch_context(self._device_side):
                self.device_update.fold(weight, step, force_check=weight > MAX_UNDO_WEIGHT)
            return None
        if self._guard is None:
            if self.offload is not None:
                self.offload.submit(weight)
            for kernel, _ in self.on_device:
                self._run_kernel(kernel, weight)
            return None
        if self.in_background and self.offload is not None:
            self._deliver(self.offload.wait())  # the previous update's outcome, before the next one starts
            self.offload.submit(weight, step)
            return None
        if self.offload is not None:
            self.offload.stage()
        outcome = self._guard.fold(weight, step, run_kernel=self._run_kernel)
        self._deliver(outcome)
        return outcome

    @torch.no_grad()
    def copy_now(self, step: int = 0) -> FoldOutcome | None:
        """Overwrite the EMA with the weights (before `start_step`, and on `reset`), synchronously; with the check,
        only when every weight is finite (on every rank).

        Args:
            step (`int`, *optional*, defaults to 0): The optimizer step, reported in the outcome.

        Returns:
            `FoldOutcome` or `None`: whether the copy was made (also passed to `on_outcome`); `None` without the check
            or when the outcome is decided on the device (`defers_outcomes`).
        """
        if self.device_update is not None:
            with launch_context(self._device_side):
                self.device_update.copy(step)
            return None
        self.wait()
        outcome = None
        if self._guard is not None:
            lists = [kernel.live for kernel, _ in self.on_device] + (self.offload.live if self.offload else [])
            outcome = self._guard.check(lists, step)
            if not outcome.folded:
                self._guard.check_first = True
                self._deliver(outcome)
                return outcome
        if self.offload is not None:
            self.offload.copy_now()
        for kernel, _ in self.on_device:
            copy_(kernel.ema, kernel.live)
        if outcome is not None and self._guard is not None:
            self._guard.check_first = False
            self._deliver(outcome)
        return outcome

    @contextlib.contextmanager
    def after_queued(self) -> Iterator[None]:
        """Context manager: tensor work inside runs after every queued update: on the side stream they run on, or
        once the background fold is done (it waits for it)."""
        if self.offload is not None:
            self.wait()
            yield
            return
        sides = [side for _, side in self.on_device if side is not None] + [self._device_side]
        side = next((s for s in sides if s is not None), None)
        with launch_context(side):
            yield

    def before_weights_change(self) -> None:
        """Order the current CUDA stream after the queued EMA work (called before every optimizer step)."""
        for side in self.sides.values():
            side.before_weights_change()

    def poll(self) -> None:
        """Deliver the outcomes that have become known since the last call (never blocks)."""
        if self.device_update is not None:
            for outcome in self.device_update.poll():
                self._deliver(outcome)
        if self.in_background and self.offload is not None:
            for outcome in self.offload.poll():
                self._deliver(outcome)

    def wait(self) -> None:
        """Block until every queued update (background thread, side stream, device) has written the EMA, and deliver
        the outcomes still on their way."""
        outcome = self.offload.wait() if self.offload is not None else None
        for side in self.sides.values():
            if side.pending:
                side.synchronize()
        self._deliver(outcome)
        if self.device_update is not None:
            for device_outcome in self.device_update.wait():
                self._deliver(device_outcome)

    def close(self) -> None:
        """Finish the in-flight update, stop the background thread and remove the optimizer hook."""
        try:
            self.wait()
        finally:
            if self.offload is not None:
                self.offload.close()
            if self._remove_guard is not None:
                self._remove_guard()
                self._remove_guard = None

"""Routes each group of EMA tensors to its update path: on-device kernel (optionally on a CUDA side stream) or
offloaded to the CPU (optionally in a background thread). `ModelEMA` owns one [`EMAUpdater`]."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import EMAConfig
from .kernels import LerpKernel, copy_
from .offload import OffloadedUpdate
from .streams import SideStream, register_pre_step_guard

__all__ = ["EMAUpdater"]


class EMAUpdater:
    """The update of a set of `(ema, live)` tensor groups, following the config's `device`, `async_update` and
    `cuda_stream`.

    Args:
        groups (`Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]`): `(ema, live)` tensor lists, each list on
            one device with one dtype.
        config (`EMAConfig`): The EMA configuration.
        backend (`str`, *optional*, defaults to `"auto"`): Kernel choice, see [`LerpKernel`].
    """

    def __init__(
        self,
        groups: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
        config: EMAConfig,
        backend: str = "auto",
    ) -> None:
        groups = [(list(e), list(w)) for e, w in groups if e]
        offloaded_from_accelerator = any(e[0].device.type == "cpu" and w[0].device.type != "cpu" for e, w in groups)
        async_update = config.async_update
        if async_update is None:
            async_update = config.device == "cpu" and offloaded_from_accelerator

        def is_offloaded(ema: list[torch.Tensor], live: list[torch.Tensor]) -> bool:
            if ema[0].device.type != "cpu":
                return False
            return live[0].device.type != "cpu" or bool(async_update)

        self.sides: dict[torch.device, SideStream] = {}
        if config.cuda_stream:
            for _, live in groups:
                if live[0].is_cuda and live[0].device not in self.sides:
                    self.sides[live[0].device] = SideStream(live[0].device)
        self.on_device: list[tuple[LerpKernel, SideStream | None]] = []
        offloaded = []
        side_for_offload = None
        for ema, live in groups:
            if is_offloaded(ema, live):
                offloaded.append((ema, live))
                side_for_offload = side_for_offload or self.sides.get(live[0].device)
            else:
                self.on_device.append((LerpKernel(ema, live, backend=backend), self.sides.get(live[0].device)))
        self.offload = (
            OffloadedUpdate(offloaded, async_update=bool(async_update), side_stream=side_for_offload, backend=backend)
            if offloaded
            else None
        )
        # With a side stream, the next optimizer step must not overwrite weights the update still reads.
        self._remove_guard = register_pre_step_guard(self) if self.sides else None

    @property
    def kernels(self) -> list[LerpKernel]:
        """Every kernel in use (on-device and offloaded), e.g. to inspect the chosen `backend`."""
        out = [kernel for kernel, _ in self.on_device]
        if self.offload is not None:
            out += self.offload.kernels
        return out

    def fold(self, weight: float) -> None:
        """One EMA update with interpolation weight `weight` (`1 - beta`).

        Args:
            weight (`float`): The interpolation weight.
        """
        if self.offload is not None:
            self.offload.submit(weight)
        for kernel, side in self.on_device:
            if side is None:
                kernel(weight)
            else:
                with side.launch():
                    kernel(weight)

    @torch.no_grad()
    def copy_now(self) -> None:
        """Overwrite the EMA with the weights (before `start_step`, and on `reset`), synchronously."""
        self.wait()
        if self.offload is not None:
            self.offload.copy_now()
        for kernel, _ in self.on_device:
            copy_(kernel.ema, kernel.live)

    def before_weights_change(self) -> None:
        """Order the current CUDA stream after the queued EMA work (called before every optimizer step)."""
        for side in self.sides.values():
            side.before_weights_change()

    def wait(self) -> None:
        """Block until every queued update (background thread, side stream) has written the EMA."""
        if self.offload is not None:
            self.offload.wait()
        for side in self.sides.values():
            if side.pending:
                side.synchronize()

    def close(self) -> None:
        """Finish the in-flight update, stop the background thread and remove the optimizer hook."""
        self.wait()
        if self.offload is not None:
            self.offload.close()
        if self._remove_guard is not None:
            self._remove_guard()
            self._remove_guard = None

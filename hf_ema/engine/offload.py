"""An EMA kept in host memory, updated from a snapshot of the weights, optionally in a background thread.

Each update stages the weights into reusable host buffers (pinned when the weights are on CUDA, so the
device-to-host copies are `non_blocking` and run on a side stream while the next step computes), then folds the
staged weights into the EMA on the CPU. With `async_update` that fold runs in one background thread: training
continues while it runs. At most one update is in flight: the next update, and every read of the EMA, first waits
for it (`wait()`), so there is no queue to grow and no read of a half-updated EMA.

Because the fold reads the staged snapshot, never the live weights, the optimizer may change the weights as soon as
the copies are done; on CUDA the next optimizer step is ordered after them by [`SideStream.before_weights_change`].

With a [`NonFiniteGuard`] (`guard`), the background fold checks the snapshot it folds in, so the decision to skip
is the one the snapshot calls for whenever the thread runs; its [`FoldOutcome`] is returned by the next `wait()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..compat.torch import foreach_copy_
from .kernels import LerpKernel
from .nonfinite import FoldOutcome, NonFiniteGuard
from .streams import SideStream

__all__ = ["MAX_FOLD_THREADS", "OffloadedUpdate"]

#: Upper bound of the background fold's threads for weights on an accelerator.
MAX_FOLD_THREADS = 8


class OffloadedUpdate:
    """The update of EMA tensors that live on the CPU.

    Args:
        groups (`Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]]`): `(ema, live)` pairs of tensor lists, one
            per group of equal dtypes; the EMA tensors are on the CPU, the weights anywhere.
        async_update (`bool`, *optional*, defaults to `True`): Fold in a background thread (else inline).
        side_stream (`SideStream`, *optional*): Stream for the device-to-host copies of CUDA weights; without it
            they are queued on the current stream.
        backend (`str`, *optional*, defaults to `"auto"`): Kernel choice, see [`LerpKernel`].
        fold_threads (`int`, *optional*): Intra-op threads of the background fold. Defaults to 1 when the weights
            are on the CPU (the fold shares the cores with training: two OpenMP teams spinning on the same cores
            slowed a 2-core Trainer run by a quarter); for weights on an accelerator, torch's thread count less two
            (the training thread must keep a core to launch kernels while the fold runs), at most 8 (a few cores
            already saturate host memory bandwidth).
        check_finite (`bool`, *optional*, defaults to `False`): Build the kernels for checked updates (see
            [`LerpKernel`]); the checks run when `guard` is set.
    """

    def __init__(
        self,
        groups: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]]],
        async_update: bool = True,
        side_stream: SideStream | None = None,
        backend: str = "auto",
        fold_threads: int | None = None,
        check_finite: bool = False,
    ) -> None:
        self.async_update = async_update
        self.side_stream = side_stream
        if fold_threads is None:
            on_cpu = any(live and live[0].device.type == "cpu" for _, live in groups)
            fold_threads = 1 if on_cpu else min(MAX_FOLD_THREADS, max(1, torch.get_num_threads() - 2))
        self.fold_threads = fold_threads
        self.live: list[list[torch.Tensor]] = []
        self.staging: list[list[torch.Tensor]] = []
        self.kernels: list[LerpKernel] = []
        self.ema: list[list[torch.Tensor]] = []
        for ema, live in groups:
            if live and live[0].device.type == "cpu" and not async_update:
                # Nothing to snapshot: fold the weights in directly.
                staging = list(live)
            else:
                pin = live[0].is_cuda if live else False
                staging = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin) for t in live]
            self.ema.append(list(ema))
            self.live.append(list(live))
            self.staging.append(staging)
            self.kernels.append(LerpKernel(ema, staging, backend=backend, check_finite=check_finite))
        #: Set by the owner to check every background fold (an inline fold is checked by the owner itself).
        self.guard: NonFiniteGuard | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None

    @property
    def in_flight(self) -> bool:
        """Whether an update is still running in the background."""
        return self._future is not None and not self._future.done()

    def poll(self) -> list[FoldOutcome]:
        """The outcome of the background update if it has finished (never blocks); re-raise its error if it failed.

        Returns:
            `list[FoldOutcome]`: empty while it runs, or when it was not checked.
        """
        if self._future is None or not self._future.done():
            return []
        outcome = self.wait()
        return [outcome] if outcome is not None else []

    def wait(self) -> FoldOutcome | None:
        """Block until the in-flight update (if any) is folded in; re-raise its error if it failed.

        Returns:
            `FoldOutcome` or `None`: the outcome of the in-flight update when `guard` checked it.
        """
        future, self._future = self._future, None
        if future is not None:
            return future.result()
        return None

    def stage(self) -> None:
        """Copy the weights into the staging buffers and wait for the copies (for an inline, checked fold)."""
        event = self._stage()
        if event is not None:
            event.synchronize()

    def _stage(self) -> Any:
        """Copy the weights into the staging buffers; returns a CUDA event to wait on, or None."""
        cuda = any(live and live[0].is_cuda for live in self.live)
        if not cuda:
            for staging, live in zip(self.staging, self.live):
                if staging is not live:
                    foreach_copy_(staging, live)
            return None
        if self.side_stream is not None:
            with self.side_stream.launch() as stream:
                self._copy_non_blocking()
                event = torch.cuda.Event()
                event.record(stream)
            return event
        self._copy_non_blocking()
        event = torch.cuda.Event()
        event.record()
        return event

    def _copy_non_blocking(self) -> None:
        for staging, live in zip(self.staging, self.live):
            for dst, src in zip(staging, live):
                dst.copy_(src, non_blocking=True)

    def _fold(self, weight: float, event: Any, step: int) -> FoldOutcome | None:
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            if self.guard is not None:
                outcome = self.guard.fold(weight, step)
                return FoldOutcome(outcome.step, outcome.folded, outcome.bad, deferred=self.async_update)
            for kernel in self.kernels:
                kernel(weight)
        return None

    def submit(self, weight: float, step: int = 0) -> FoldOutcome | None:
        """Snapshot the weights and fold them in with interpolation weight `weight` (`1 - beta`): in the
        background when `async_update`, else before returning.

        Args:
            weight (`float`): The interpolation weight.
            step (`int`, *optional*, defaults to 0): The optimizer step, reported in the outcome of a checked fold.

        Returns:
            `FoldOutcome` or `None`: the outcome of an inline checked fold; `None` in the background (its outcome
            comes from the next `wait()`) or without `guard`.
        """
        self.wait()
        event = self._stage()
        if not self.async_update:
            return self._fold(weight, event, step)
        if self._executor is None:
            self._start_worker()
        assert self._executor is not None  # started just above
        self._future = self._executor.submit(self._fold, weight, event, step)
        return None

    def _init_worker(self) -> None:
        torch.get_num_threads()  # initialise this thread's intra-op setting first, so it is not re-read later
        if self.fold_threads is not None:  # the worker gets this initializer only when it is set
            torch.set_num_threads(self.fold_threads)

    def _start_worker(self) -> None:
        if self.fold_threads is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-ema-update")
            return
        previous = torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hf-ema-update", initializer=self._init_worker
        )
        self._executor.submit(lambda: None).result()  # run the initializer now
        # `set_num_threads` in the worker also changed the default of threads created later: restore it (the worker
        # keeps its own OpenMP setting, which is per thread).
        torch.set_num_threads(previous)

    @torch.no_grad()
    def copy_now(self) -> None:
        """Overwrite the EMA with the current weights, synchronously (used before `start_step` and by `reset`)."""
        self.wait()
        for ema, live in zip(self.ema, self.live):
            for dst, src in zip(ema, live):
                dst.copy_(src)

    def close(self) -> None:
        """Wait for the in-flight update and stop the background thread."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)

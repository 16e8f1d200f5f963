"""The CUDA side stream the EMA work can run on, and the synchronisation that keeps it correct.

Order of events around one update (NeMo's EMA does the same):

1. `launch()`: the side stream waits for the current stream, so it reads the weights the optimizer just wrote;
   the update (or the device-to-host copy of an offloaded EMA) is queued on the side stream and the host returns
   at once: the next forward/backward overlaps with it.
2. `before_weights_change()`, called before the next optimizer step: the current stream waits for the side stream
   (a device-side wait, the host does not block), so the optimizer cannot overwrite weights the update still reads.
3. `synchronize()`, called before any host read of the EMA (save, swap, state dict): the host waits.

The class takes the `torch.cuda`-like module as an argument so that the ordering logic is testable without a GPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["SideStream", "register_pre_step_guard"]


class SideStream:
    """A dedicated stream for the EMA work on one CUDA device.

    Args:
        device (`torch.device`): The CUDA device of the weights.
        backend (*optional*): The `torch.cuda` module, or an object with the same `Stream`, `current_stream` and
            `stream` members (tests pass a recording stand-in, since no GPU runs there).
    """

    def __init__(self, device: torch.device, backend: Any = None) -> None:
        self.backend = backend if backend is not None else torch.cuda
        self.device = device
        self.stream = self.backend.Stream(device=device)
        self.pending = False

    @contextlib.contextmanager
    def launch(self) -> Iterator[Any]:
        """Context manager: the work queued inside runs on the side stream, after everything already queued on the
        current stream.

        Yields:
            The side stream.
        """
        self.stream.wait_stream(self.backend.current_stream(self.device))
        with self.backend.stream(self.stream):
            yield self.stream
        self.pending = True

    def before_weights_change(self) -> None:
        """Make the current stream wait for the queued EMA work (no host synchronisation)."""
        if self.pending:
            self.backend.current_stream(self.device).wait_stream(self.stream)
            self.pending = False

    def synchronize(self) -> None:
        """Block the host until the queued EMA work is done, and order the current stream after it."""
        self.backend.current_stream(self.device).wait_stream(self.stream)
        self.stream.synchronize()
        self.pending = False


def register_pre_step_guard(owner: Any, method: str = "before_weights_change") -> Callable[[], None]:
    """Call `owner.<method>()` before every `torch.optim.Optimizer.step` in the process.

    The hook holds only a weak reference: once `owner` is garbage collected the hook removes itself.

    Args:
        owner: The object to notify (a `ModelEMA`).
        method (`str`, *optional*, defaults to `"before_weights_change"`): The method to call.

    Returns:
        A function that removes the hook.
    """
    ref = weakref.ref(owner)
    handle = None

    def hook(optimizer, args, kwargs):
        target = ref()
        if target is None:
            if handle is not None:
                handle.remove()
            return None
        getattr(target, method)()
        return None

    handle = register_optimizer_step_pre_hook(hook)
    return handle.remove

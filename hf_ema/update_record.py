"""What an EMA's updates did, as known on the host: the counters an exact resume restores, the updates whose outcome
is still on its way (decided on the GPU, or folded in the background), and the warning or error of an update skipped
because the weights held NaN or inf."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .engine.nonfinite import FoldOutcome
from .errors import NonFiniteWeightsError

__all__ = ["SKIP_WARNING_INTERVAL_S", "Counters", "UpdateRecord"]

#: At most one warning about skipped updates per this many seconds (the next one counts those left out).
SKIP_WARNING_INTERVAL_S = 60.0

logger = logging.getLogger("hf_ema.model_ema")


@dataclass
class Counters:
    """What the EMA has done so far (see the properties of the same names on `ModelEMA`).

    Args:
        num_updates (`int`): Updates made.
        num_skipped (`int`): Updates and copies skipped for NaN/inf weights.
        last_decay (`float`, *optional*): The beta of the last update made (0.0 after a copy).
        last_skipped_step (`int`, *optional*): The step of the last skipped update.
        last_interval (`int`, *optional*): Optimizer steps covered by the last update.
        intervals (`dict[int, int]`): Updates per interval, in optimizer steps (one skipped for NaN/inf included).
    """

    num_updates: int = 0
    num_skipped: int = 0
    last_decay: float | None = None
    last_skipped_step: int | None = None
    last_interval: int | None = None
    intervals: dict[int, int] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        """The counters an exact resume restores, as JSON-ready values (the keys of `ema_state.json`)."""
        return {
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "decay": self.last_decay,
            "update_intervals": {str(k): v for k, v in sorted(self.intervals.items())},
            "last_interval": self.last_interval,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `to_state()` wrote (keys it lacks keep their values: states saved before them).

        Args:
            state (`dict`): The saved state.
        """
        self.num_updates = int(state.get("num_updates", self.num_updates))
        self.num_skipped = int(state.get("num_skipped", self.num_skipped))
        self.last_decay = state.get("decay", self.last_decay)
        intervals = state.get("update_intervals")
        if intervals is not None:
            self.intervals = {int(k): int(v) for k, v in intervals.items()}
        self.last_interval = state.get("last_interval", self.last_interval)


class UpdateRecord:
    """Counts every update and copy of an EMA, at once or when its outcome arrives, and reports skipped ones.

    Args:
        on_nonfinite (`str`): `EMAConfig.on_nonfinite`: `"raise"` raises on a skip, else a rate-limited warning.
        tensor_name (`Callable[[tuple[int, int]], str]`): The name of the tensor at a `(group, index)` position.
    """

    def __init__(self, on_nonfinite: str, tensor_name: Callable[[tuple[int, int]], str]) -> None:
        self.counters = Counters()
        self.on_nonfinite = on_nonfinite
        self.tensor_name = tensor_name
        # Updates queued whose outcome is not known yet: step -> (beta, is_copy); they arrive in order.
        self.pending: dict[int, tuple[float, bool]] = {}
        self._last_warning: float | None = None
        self._unwarned = 0

    def made(self, beta: float, is_copy: bool = False) -> None:
        """Count an update (or copy) known to be made.

        Args:
            beta (`float`): Its decay (0.0 for a copy).
            is_copy (`bool`, *optional*, defaults to `False`): A copy of the weights, not an update.
        """
        self.counters.last_decay = 0.0 if is_copy else beta
        self.counters.num_updates += 0 if is_copy else 1

    def queued(self, step: int, beta: float, is_copy: bool = False) -> None:
        """Note an update (or copy) whose outcome arrives later through `record()`.

        Args:
            step (`int`): Its optimizer step.
            beta (`float`): Its decay.
            is_copy (`bool`, *optional*, defaults to `False`): A copy of the weights, not an update.
        """
        self.pending[step] = (beta, is_copy)

    def interval(self, steps: int) -> None:
        """Note the interval, in optimizer steps, of an update being made.

        Args:
            steps (`int`): Optimizer steps it covers.
        """
        self.counters.last_interval = steps
        self.counters.intervals[steps] = self.counters.intervals.get(steps, 0) + 1

    def record(self, outcome: FoldOutcome) -> None:
        """Count a checked update or copy; on a skip warn (rate-limited) or raise, as `on_nonfinite` says.

        Args:
            outcome (`FoldOutcome`): What became of it.
        """
        queued = self.pending.pop(outcome.step, None) if outcome.deferred else None
        if outcome.folded:
            if queued is not None:  # counted now that it is known to be made
                self.made(*queued)
            return
        counters = self.counters
        counters.num_skipped += 1
        counters.last_skipped_step = outcome.step
        if outcome.bad is not None:
            where = f"first non-finite tensor: {self.tensor_name(outcome.bad)!r}"
        else:
            where = "in another rank's shard"
        if self.on_nonfinite == "raise":
            raise NonFiniteWeightsError(
                f"the weights hold NaN or inf at step {outcome.step} ({where}); the EMA update was not made and the "
                f"EMA is unchanged (on_nonfinite='raise')"
            )
        self._warn(outcome.step, where)

    def _warn(self, step: int, where: str) -> None:
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < SKIP_WARNING_INTERVAL_S:
            self._unwarned += 1
            return
        more = f", {self._unwarned} more since the last warning" if self._unwarned else ""
        logger.warning(
            "hf-ema: the weights hold NaN or inf at step %d (%s): EMA update skipped, the EMA keeps the average of "
            "the finite steps (%d skipped so far%s)",
            step,
            where,
            self.counters.num_skipped,
            more,
        )
        self._last_warning, self._unwarned = now, 0

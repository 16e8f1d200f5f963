"""`ModelEMA`: the EMA of a model's weights, independent of `Trainer`, usable in any training loop."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import EMAConfig
from .ema_tensor import EMATensor, TensorKind
from .engine.kernels import copy_
from .engine.nonfinite import Agreement, FoldOutcome
from .engine.updater import EMAUpdater
from .errors import CheckpointError, ConfigTypeError, NonFiniteWeightsError, StateError
from .selection import Selection, unwrap_model
from .sharding import ShardLayout, comm_device, detect_layout
from .sharding.collectives import all_ranks_agree, new_cpu_group, reduce_max_

__all__ = ["ModelEMA", "STATE_FORMAT_VERSION"]

STATE_FORMAT_VERSION = 1
#: At most one warning about skipped updates per this many seconds (the next one counts those left out).
SKIP_WARNING_INTERVAL_S = 60.0

logger = logging.getLogger(__name__)


class _Group:
    """Indices of tensors updated together by one multi-tensor call (same device and dtypes)."""

    __slots__ = ("ema", "live", "indices")

    def __init__(self) -> None:
        self.ema: list[torch.Tensor] = []
        self.live: list[torch.Tensor] = []
        self.indices: list[int] = []


@dataclass
class _Counters:
    """What the EMA has done so far, as known on the host (see the properties of the same names on `ModelEMA`)."""

    num_updates: int = 0
    num_skipped: int = 0
    last_decay: float | None = None
    last_skipped_step: int | None = None
    last_interval: int | None = None
    intervals: dict[int, int] = field(default_factory=dict)


class ModelEMA:
    """Exponential moving average of a model's weights, kept in fp32 (by default) on each rank's local shard.

    Call `update()` after every optimizer step. The math is `ema = beta * ema + (1 - beta) * weights`, with `beta`
    from the config's schedule; before `start_step` the EMA copies the weights.

    Non-finite weights never enter the EMA: an update (or copy) that would read a NaN or an inf is skipped, on every
    rank of a sharded EMA alike, the EMA keeps the average of the finite steps, and the skip is counted in
    `num_skipped` and logged (`EMAConfig.on_nonfinite`: `"skip"`, `"raise"` or `"ignore"`).

    ```python
    ema = ModelEMA(model, decay=0.999)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
    with ema.swapped():  # the model holds the EMA weights inside the block, the raw ones after it
        evaluate(model)
    ```

    Args:
        model (`nn.Module`): The model whose weights are averaged (DDP / `torch.compile` wrappers are unwrapped).
        config (`EMAConfig`, *optional*): The configuration; built from `**kwargs` when not given.
        **kwargs: Fields of [`EMAConfig`] when `config` is not given.
    """

    def __init__(self, model: nn.Module, config: EMAConfig | None = None, **kwargs: Any) -> None:
        config = EMAConfig.resolve(config, kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config
        self.model = unwrap_model(model)
        self.layout: ShardLayout = detect_layout(model, config)
        self.selection: Selection = self.layout.select(self.model, config)
        self.names: list[str] = [name for name, _ in self.selection.averaged]
        self.copied_names: list[str] = [name for name, _ in self.selection.copied]
        self._live = [self.layout.local(n, t) for n, t in self.selection.averaged]
        self._copied_live = [self.layout.local(n, t) for n, t in self.selection.copied]
        self.shadow: list[torch.Tensor] = [self._new_ema_tensor(t) for t in self._live]
        self.copied: list[torch.Tensor] = [t.detach().clone() for t in self._copied_live]
        self.step = 0
        self._counters = _Counters()
        # Updates queued whose outcome (made or skipped for a NaN/inf) is not known yet: step -> (beta, is_copy).
        # Their outcomes arrive in order through `_record_outcome` (`EMAUpdater.defers_outcomes`).
        self._pending: dict[int, tuple[float, bool]] = {}
        # Steps whose update was coalesced into the next one (the background fold of an offloaded EMA was busy).
        self._coalesced_steps = 0
        self._last_warning: float | None = None
        self._unwarned = 0
        #: True while `swapped()` has the EMA weights in the model.
        self.is_swapped = False
        self._groups = self._build_groups()
        # Picks the kernel per group and runs offloaded / side-stream updates (see `hf_ema/updater.py`).
        self._updater = EMAUpdater([(g.ema, g.live) for g in self._groups], config)
        self._updater.on_outcome = self._record_outcome
        self._updater.set_agreement(self._agreement())
        self._updater.set_device_reduce(self._device_reduce())
        self._any_busy = self._busy_agreement()

    @property
    def live_tensors(self) -> list[torch.Tensor]:
        """The model-side tensors the EMA averages (this rank's local shards), in the order of `names`/`shadow`."""
        return list(self._live)

    def named_tensors(self, include_copied: bool = True) -> Iterator[EMATensor]:
        """Each EMA tensor with its name, the model-side tensor it follows and its kind, as `named_parameters()`
        yields a module's parameters: the averaged tensors first (in the order of `names`), then the copied ones.

        ```python
        for t in ema.named_tensors():
            print(t.name, t.kind, t.ema.dtype, t.live.dtype)
        ```

        The tensors are this rank's (shards, for a sharded EMA) and are read as they are: call `wait()` first when
        an update may still be running (`async_update`, `cuda_stream`).

        Args:
            include_copied (`bool`, *optional*, defaults to `True`): Also yield the copied (non-averaged) tensors.

        Yields:
            [`EMATensor`]: `(name, ema, live, kind)`.
        """
        for name, ema, live in zip(self.names, self.shadow, self._live):
            yield EMATensor(name, ema, live, TensorKind.AVERAGED)
        if include_copied:
            for name, ema, live in zip(self.copied_names, self.copied, self._copied_live):
                yield EMATensor(name, ema, live, TensorKind.COPIED)

    def _tensors_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Another model's parameters and buffers by name; it must hold every EMA tensor."""
        state: dict[str, torch.Tensor] = dict(model.named_parameters())
        state.update(model.named_buffers())
        missing = [t.name for t in self.named_tensors() if t.name not in state]
        if missing:
            raise CheckpointError(f"`model` lacks {len(missing)} EMA tensors, e.g. {missing[:3]!r}")
        return state

    # ------------------------------------------------------------------ set-up helpers
    def _ema_device(self, live: torch.Tensor) -> torch.device:
        return torch.device(self.config.device) if self.config.device is not None else live.device

    def _new_ema_tensor(self, live: torch.Tensor) -> torch.Tensor:
        device = self._ema_device(live)
        # An EMA offloaded from CUDA lives in pinned memory: fast, non_blocking copies when it is swapped in.
        pin = device.type == "cpu" and live.is_cuda
        out = torch.empty(live.shape, dtype=self.config.torch_dtype, device=device, pin_memory=pin)
        out.copy_(live.detach())
        return out

    def _build_groups(self) -> list[_Group]:
        groups: dict[tuple, _Group] = {}
        for i, (ema, live) in enumerate(zip(self.shadow, self._live)):
            key = (ema.device, ema.dtype, live.device, live.dtype)
            group = groups.setdefault(key, _Group())
            group.ema.append(ema)
            group.live.append(live)
            group.indices.append(i)
        return list(groups.values())

    def _agreement(self) -> Agreement | None:
        # Each rank of a sharded EMA checks only its own shards: the ranks must agree on every skip, or the shards
        # would hold the averages of different steps. A replicated EMA reads the same weights on every rank.
        layout = self.layout
        if not self._updater.check or not layout.is_sharded or layout.world_size <= 1:
            return None
        if self._updater.in_background:
            # The update thread's collective must not interleave with the training's: a process group of its own
            # (created here, where every rank builds its EMA).
            group, device = new_cpu_group(), torch.device("cpu")
        else:
            group, device = None, comm_device()
        return functools.partial(all_ranks_agree, group=group, device=device)

    def _device_reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        # The same agreement for the Triton update, whose flags stay on the device: an all-reduce queued on the
        # stream (NCCL never makes the host wait for it).
        layout = self.layout
        if self._updater.device_update is None or not self._updater.check:
            return None
        if not layout.is_sharded or layout.world_size <= 1:
            return None
        return reduce_max_

    def _busy_agreement(self) -> Agreement | None:
        # Coalescing must be decided alike on every rank of a sharded EMA: each shard must average the same steps,
        # and the background folds' collectives must pair up. An update is coalesced when any rank's fold is busy
        # (over a CPU process group of its own: the update thread has the other one).
        layout = self.layout
        if not self._updater.in_background or not layout.is_sharded or layout.world_size <= 1:
            return None
        group = new_cpu_group()

        def any_busy(busy: bool) -> bool:
            return not all_ranks_agree(not busy, group=group, device=torch.device("cpu"))

        return any_busy

    # ------------------------------------------------------------------ counters
    def _settled(self) -> _Counters:
        # Outcomes still on their way (decided on the device, or folded in the background) are fetched when a
        # counter is read: a host synchronisation only then (logging, saving), never in `update()`.
        if self._pending:
            self._updater.wait()
        return self._counters

    @property
    def num_updates(self) -> int:
        """EMA updates made (copies before `start_step` and skipped updates not counted)."""
        return self._settled().num_updates

    @property
    def num_skipped(self) -> int:
        """Updates (and copies) skipped because the weights held NaN or inf (saved in `ema_state.json`)."""
        return self._settled().num_skipped

    @property
    def last_decay(self) -> float | None:
        """The `beta` of the last update made (over its whole interval; 0.0 after a copy), or `None`."""
        return self._settled().last_decay

    @property
    def last_skipped_step(self) -> int | None:
        """The step of the last skipped update, or `None`."""
        return self._settled().last_skipped_step

    @property
    def last_interval(self) -> int | None:
        """Optimizer steps covered by the last update: `update_every`, or more when updates of an offloaded EMA were
        coalesced while its background fold was busy (logged as `ema_update_interval`). `None` before the first."""
        return self._counters.last_interval

    @property
    def coalesces(self) -> bool:
        """Whether updates may be coalesced: the EMA is offloaded and folded in the background (`device="cpu"`)."""
        return self._updater.in_background

    @property
    def update_intervals(self) -> dict[int, int]:
        """How many updates covered each interval, in optimizer steps (`{update_every: n}` unless updates were
        coalesced; saved in `ema_state.json`)."""
        return dict(self._counters.intervals)

    # ------------------------------------------------------------------ non-finite weights
    def _record_outcome(self, outcome: FoldOutcome) -> None:
        """Count a checked update or copy; on a skip warn (rate-limited) or raise, as the config says."""
        counters = self._counters
        queued = self._pending.pop(outcome.step, None) if outcome.deferred else None
        if outcome.folded:
            if queued is not None:  # counted now that it is known to be made
                beta, is_copy = queued
                counters.last_decay = 0.0 if is_copy else beta
                counters.num_updates += 0 if is_copy else 1
            return
        counters.num_skipped += 1
        counters.last_skipped_step = outcome.step
        if outcome.bad is not None:
            gid, index = outcome.bad
            where = f"first non-finite tensor: {self.names[self._groups[gid].indices[index]]!r}"
        else:
            where = "in another rank's shard"
        if self.config.on_nonfinite == "raise":
            raise NonFiniteWeightsError(
                f"the weights hold NaN or inf at step {outcome.step} ({where}); the EMA update was not made and the "
                f"EMA is unchanged (on_nonfinite='raise')"
            )
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < SKIP_WARNING_INTERVAL_S:
            self._unwarned += 1
            return
        more = f", {self._unwarned} more since the last warning" if self._unwarned else ""
        logger.warning(
            "hf-ema: the weights hold NaN or inf at step %d (%s): EMA update skipped, the EMA keeps the average of "
            "the finite steps (%d skipped so far%s)",
            outcome.step,
            where,
            counters.num_skipped,
            more,
        )
        self._last_warning, self._unwarned = now, 0

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into the EMA. Call once per optimizer step.

        On a GPU with Triton the update is one fused pass per group and never synchronises the host: the check for
        NaN/inf and the decision to skip are made on the device, and a skip is counted (or raised, with
        `on_nonfinite="raise"`) once its outcome has reached the host: at a later `update()`, or when the EMA or a
        counter is read. For an offloaded EMA (`device="cpu"`) whose background fold is still busy, the update is
        coalesced into the next one, which folds the newest weights with `beta ** k` for the `k` steps since the
        last fold (at most `max_update_interval`; then it waits).

        Args:
            step (`int`, *optional*): The optimizer step just completed (1 after the first step). Defaults to one
                more than the last step seen.

        Returns:
            `bool`: whether the EMA changed: False on the steps skipped by `update_every`, on coalesced steps, and
            on updates skipped for non-finite weights when that is known at once (an update whose outcome comes
            later returns True; a skip is counted when it is known).

        Raises:
            `NonFiniteWeightsError`: with `on_nonfinite="raise"`, when the weights hold NaN or inf (for an update
            decided on the device or in the background: at the next `update()` or read of the EMA). The EMA is
            left as it was.
        """
        if self.is_swapped:
            raise StateError("`update()` called while the EMA is swapped into the model (inside `swapped()`)")
        self._updater.poll()  # outcomes that have reached the host since the last call, without waiting
        self.step = self.step + 1 if step is None else int(step)
        cfg = self.config
        if self.step <= cfg.start_step:
            return self._copy_weights()
        t = self.step - cfg.start_step
        if t % cfg.update_every != 0:
            return False
        interval = cfg.update_every + self._coalesced_steps
        if interval < cfg.max_update_interval and self._is_busy():
            self._coalesced_steps = interval  # the background fold still runs: take this step with the next one
            return False
        return self._fold(t, interval)

    def _is_busy(self) -> bool:
        busy = self._updater.busy
        return self._any_busy(busy) if self._any_busy is not None else busy

    def _copy_weights(self) -> bool:
        outcome = self._updater.copy_now(step=self.step)
        if self._updater.defers_outcomes:
            self._pending[self.step] = (0.0, True)
        elif outcome is not None and not outcome.folded:
            return False
        else:
            self._counters.last_decay = 0.0
        copy_(self.copied, self._copied_live)
        return True

    def _fold(self, t: int, interval: int) -> bool:
        """The update at `t` steps after `start_step`, covering the last `interval` optimizer steps."""
        self._coalesced_steps = 0
        beta = self.config.decay_at(t, interval=interval)
        counters = self._counters
        counters.last_interval = interval
        counters.intervals[interval] = counters.intervals.get(interval, 0) + 1
        outcome = self._updater.fold(1.0 - beta, step=self.step)
        if self._updater.defers_outcomes:
            self._pending[self.step] = (beta, False)
        elif outcome is not None and not outcome.folded:
            return False
        else:
            counters.num_updates += 1
            counters.last_decay = beta
        copy_(self.copied, self._copied_live)
        return True

    def wait(self) -> None:
        """Block until every queued update (background thread of an offloaded EMA, CUDA side stream, GPU kernel)
        has written the EMA, and fold in the steps coalesced since the last fold (an offloaded EMA whose fold was
        busy). Every method that reads the EMA calls it; call it yourself before reading `shadow` directly."""
        self._updater.wait()
        if self._coalesced_steps:
            t = self.step - self.config.start_step
            self._fold(t - t % self.config.update_every, self._coalesced_steps)
            self._updater.wait()

    def close(self) -> None:
        """Finish the in-flight update and release the background thread and the optimizer hook."""
        self._updater.close()

    # ------------------------------------------------------------------ moving weights in and out
    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite the model's weights with the EMA (cast to the model's dtype).

        Args:
            model (`nn.Module`, *optional*): Another model with the same parameter names; defaults to the tracked one.
        """
        self.wait()
        if model is None or unwrap_model(model) is self.model:
            pairs = [(t.live, t.ema) for t in self.named_tensors()]
        elif self.layout.is_sharded:
            self._copy_full_to(unwrap_model(model))
            return
        else:
            state = self._tensors_of(unwrap_model(model))
            pairs = [(self.layout.local(t.name, state[t.name]), t.ema) for t in self.named_tensors()]
        for dst, src in pairs:
            dst.copy_(src)
        # A DDP-sharded EMA wrote only this rank's chunks: the layout exchanges them (a collective).
        self.layout.after_write([dst for dst, _ in pairs])

    @torch.no_grad()
    def _copy_full_to(self, other: nn.Module) -> None:
        # Another, unsharded model (e.g. one for evaluation on every rank): gather one full tensor at a time.
        state = self._tensors_of(other)
        for t in self.named_tensors():
            full = self.layout.full_tensor(t.name, t.ema, all_ranks=True)
            assert full is not None  # every rank gets it with `all_ranks=True`
            state[t.name].detach().copy_(full)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside the block, its raw weights again after it,
        also when the block raises.

        When the EMA and the weights share dtype and device the swap is in place (no copy of the model); otherwise
        the raw weights are kept in a buffer of the weights' own dtype while the EMA is in.

        Yields:
            `nn.Module`: the tracked (unwrapped) model.
        """
        if self.is_swapped:
            # Re-entrant: the EMA is already in; swapping again would put the raw weights back.
            yield self.model
            return
        backup = self._swap_in()
        self.is_swapped = True
        try:
            yield self.model
        finally:
            self.is_swapped = False
            self._swap_out(backup)

    @torch.no_grad()
    def _swap_in(self) -> list[torch.Tensor | None]:
        self.wait()
        backup: list[torch.Tensor | None] = []
        averaged = list(self.named_tensors(include_copied=False))
        for t in averaged:
            if t.live.dtype == t.ema.dtype and t.live.device == t.ema.device:
                # Exact in-place exchange through one tensor-sized temporary.
                tmp = t.live.clone()
                t.live.copy_(t.ema)
                t.ema.copy_(tmp)
                backup.append(None)
            else:
                backup.append(t.live.clone())
                t.live.copy_(t.ema)
        self.layout.after_write([t.live for t in averaged])
        return backup

    @torch.no_grad()
    def _swap_out(self, backup: list[torch.Tensor | None]) -> None:
        averaged = list(self.named_tensors(include_copied=False))
        for t, saved in zip(averaged, backup):
            if saved is None:
                tmp = t.live.clone()
                t.live.copy_(t.ema)
                t.ema.copy_(tmp)
            else:
                t.live.copy_(saved)
        self.layout.after_write([t.live for t in averaged])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The EMA state: this rank's tensors by name, plus step counters and config.

        Returns:
            `dict`: `{"tensors": {name: tensor}, "step": int, "num_updates": int, "num_skipped": int,
            "decay": float | None, "update_intervals": {str: int}, "config": dict, "format_version": int}`.
        """
        self.wait()
        return {
            "tensors": {t.name: t.ema for t in self.named_tensors()},
            "step": self.step,
            **self.counter_state(),
            "config": self.config.to_dict(),
            "format_version": STATE_FORMAT_VERSION,
        }

    def counter_state(self) -> dict[str, Any]:
        """The counters an exact resume restores, as JSON-ready values: `num_updates`, `num_skipped`, `decay` (the
        last update's beta), `update_intervals` (`{interval in steps (as str): updates}`) and `last_interval`."""
        counters = self._settled()
        return {
            "num_updates": counters.num_updates,
            "num_skipped": counters.num_skipped,
            "decay": counters.last_decay,
            "update_intervals": {str(k): v for k, v in sorted(counters.intervals.items())},
            "last_interval": counters.last_interval,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a state produced by `state_dict()`.

        Args:
            state (`dict`): The state; `state["tensors"]` maps names to tensors of this rank's shapes.
            strict (`bool`, *optional*, defaults to `True`): Fail when a tracked tensor is missing.
        """
        self.wait()
        tensors = state["tensors"]
        ours = list(self.named_tensors())
        missing = [t.name for t in ours if t.name not in tensors]
        if missing and strict:
            raise CheckpointError(f"EMA state lacks {len(missing)} of {len(ours)} tensors, e.g. {missing[:3]!r}")
        for t in ours:
            src = tensors.get(t.name)
            if src is None:
                continue
            if tuple(src.shape) != tuple(t.ema.shape):
                raise CheckpointError(
                    f"EMA tensor {t.name!r} has shape {tuple(src.shape)} in the state, {tuple(t.ema.shape)} in the "
                    f"model"
                )
            t.ema.copy_(src)
        self.step = int(state.get("step", self.step))
        counters = self._counters
        counters.num_updates = int(state.get("num_updates", counters.num_updates))
        counters.num_skipped = int(state.get("num_skipped", counters.num_skipped))
        counters.last_decay = state.get("decay", counters.last_decay)
        intervals = state.get("update_intervals")
        if intervals is not None:
            counters.intervals = {int(k): int(v) for k, v in intervals.items()}
        counters.last_interval = state.get("last_interval", counters.last_interval)
        self._coalesced_steps = 0

    def reset(self) -> None:
        """Restart the EMA from the model's current weights (keeps the step counter). Weights holding NaN or inf
        are not copied (see `EMAConfig.on_nonfinite`); for a sharded EMA on several ranks that check is a
        collective call."""
        self._coalesced_steps = 0
        with torch.no_grad():
            outcome = self._updater.copy_now(step=self.step)
            if outcome is None or outcome.folded:
                copy_(self.copied, self._copied_live)

    @torch.no_grad()
    def full_state_dict(self, dtype: str | torch.dtype = "model") -> dict[str, torch.Tensor] | None:
        """The full (unsharded) EMA tensors by name, gathered one tensor at a time onto the main process.

        A collective call under `torch.distributed`: every rank must make it. Returns `None` on other ranks.

        Args:
            dtype (`str` or `torch.dtype`, *optional*, defaults to `"model"`): `"model"` casts each tensor to the
                dtype of the weight it averages (what `save_pretrained` writes), `"ema"` keeps the EMA dtype, or a
                `torch.dtype`.
        """
        if dtype not in ("model", "ema") and not isinstance(dtype, torch.dtype):
            raise ConfigTypeError(f"`dtype` must be 'model', 'ema' or a torch.dtype, got {dtype!r}")
        fixed = dtype if isinstance(dtype, torch.dtype) else None
        self.wait()
        out: dict[str, torch.Tensor] | None = {} if self.layout.is_main_process() else None
        for t in self.named_tensors():
            full = self.layout.full_tensor(t.name, t.ema)
            if out is None or full is None:
                continue
            # A copied tensor (an integer buffer) keeps its dtype.
            target = (fixed or (t.live.dtype if dtype == "model" else t.ema.dtype)) if t.averaged else t.ema.dtype
            out[t.name] = full.detach().to("cpu", dtype=target, copy=True)
        return out

    def num_bytes(self) -> int:
        """Bytes of EMA tensors held by this rank."""
        return sum(t.ema.numel() * t.ema.element_size() for t in self.named_tensors())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tensors={len(self.names)}, step={self.step}, updates={self.num_updates}, "
            f"dtype={self.config.dtype}, layout={self.layout.kind})"
        )

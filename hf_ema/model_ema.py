"""`ModelEMA`: the EMA of a model's weights, independent of `Trainer`, usable in any training loop."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
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
from .sharding.collectives import all_ranks_agree, new_cpu_group

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
        #: Each config the EMA has run with and the step it took effect (`{"step", "config"}`; the last is `config`):
        #: more than one when a resume changed the settings (`load_ema(..., allow_config_change=True)`).
        self.config_history: list[dict[str, Any]] = [{"step": 0, "config": config.to_dict()}]
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
        self.num_updates = 0
        self.last_decay: float | None = None
        #: Updates skipped because the weights held NaN or inf (saved in `ema_state.json`).
        self.num_skipped = 0
        #: The step of the last skipped update, or `None`.
        self.last_skipped_step: int | None = None
        self._last_warning: float | None = None
        self._unwarned = 0
        # (step, decay before it) of the update running in the background, undone in the counters if it is skipped.
        self._in_flight: tuple[int, float | None] | None = None
        #: True while `swapped()` has the EMA weights in the model.
        self.is_swapped = False
        self._groups = self._build_groups()
        # Picks the kernel per group and runs offloaded / side-stream updates (see `hf_ema/updater.py`).
        self._updater = EMAUpdater([(g.ema, g.live) for g in self._groups], config)
        self._updater.on_outcome = self._record_outcome
        self._updater.set_agreement(self._agreement())

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

    # ------------------------------------------------------------------ non-finite weights
    def _record_outcome(self, outcome: FoldOutcome) -> None:
        """Count a checked update or copy; on a skip warn (rate-limited) or raise, as the config says."""
        if outcome.in_background and self._in_flight is not None and self._in_flight[0] == outcome.step:
            if not outcome.folded:  # `update()` counted it when it was queued
                self.num_updates -= 1
                self.last_decay = self._in_flight[1]
            self._in_flight = None
        if outcome.folded:
            return
        self.num_skipped += 1
        self.last_skipped_step = outcome.step
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
            self.num_skipped,
            more,
        )
        self._last_warning, self._unwarned = now, 0

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into the EMA. Call once per optimizer step.

        Args:
            step (`int`, *optional*): The optimizer step just completed (1 after the first step). Defaults to one
                more than the last step seen.

        Returns:
            `bool`: whether the EMA changed: False on the steps skipped by `update_every` and on updates skipped
            for non-finite weights (an update running in the background returns True; a skip is counted when it
            finishes).

        Raises:
            `NonFiniteWeightsError`: with `on_nonfinite="raise"`, when the weights hold NaN or inf (for an update
            in the background: at the next `update()` or read of the EMA). The EMA is left as it was.
        """
        if self.is_swapped:
            raise StateError("`update()` called while the EMA is swapped into the model (inside `swapped()`)")
        self.step = self.step + 1 if step is None else int(step)
        cfg = self.config
        if self.step <= cfg.start_step:
            outcome = self._updater.copy_now(step=self.step)
            if outcome is not None and not outcome.folded:
                return False
            copy_(self.copied, self._copied_live)
            self.last_decay = 0.0
            return True
        t = self.step - cfg.start_step
        if t % cfg.update_every != 0:
            return False
        beta = cfg.decay_at(t)
        background = self._updater.check and self._updater.in_background
        if background:
            self._updater.wait()  # settle the counters of the update in flight before queuing this one
            self._in_flight = (self.step, self.last_decay)
        outcome = self._updater.fold(1.0 - beta, step=self.step)
        if outcome is not None and not outcome.folded:
            return False
        copy_(self.copied, self._copied_live)
        self.num_updates += 1
        self.last_decay = beta
        return True

    def wait(self) -> None:
        """Block until the in-flight update (background thread of an offloaded EMA, CUDA side stream) has written
        the EMA. Every method that reads the EMA calls it; call it yourself before reading `shadow` directly."""
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
            "decay": float | None, "config": dict, "config_history": list, "format_version": int}`.
        """
        self.wait()
        return {
            "tensors": {t.name: t.ema for t in self.named_tensors()},
            "step": self.step,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "decay": self.last_decay,
            "config": self.config.to_dict(),
            "config_history": [dict(entry) for entry in self.config_history],
            "format_version": STATE_FORMAT_VERSION,
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
        self.num_updates = int(state.get("num_updates", self.num_updates))
        self.num_skipped = int(state.get("num_skipped", self.num_skipped))
        self.last_decay = state.get("decay", self.last_decay)
        if "config_history" in state:
            self.config_history = [dict(entry) for entry in state["config_history"]]

    def reset(self) -> None:
        """Restart the EMA from the model's current weights (keeps the step counter). Weights holding NaN or inf
        are not copied (see `EMAConfig.on_nonfinite`); for a sharded EMA on several ranks that check is a
        collective call."""
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

"""`ModelEMA`: the EMA of a model's weights, independent of `Trainer`, usable in any training loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .bema import BiasCorrection
from .config import EMAConfig
from .ema_tensor import EMATensor, TensorKind, group_tensors, new_ema_tensor
from .engine.kernels import copy_
from .engine.nonfinite import FoldOutcome
from .engine.updater import EMAUpdater
from .errors import CheckpointError, ConfigTypeError, StateError
from .selection import Selection, unwrap_model
from .sharding import ShardLayout, detect_layout
from .sharding.agreements import agreements_for
from .update_record import Counters, UpdateRecord

__all__ = ["ModelEMA", "STATE_FORMAT_VERSION"]

STATE_FORMAT_VERSION = 1


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
        self.shadow: list[torch.Tensor] = [new_ema_tensor(t, config) for t in self._live]
        self.copied: list[torch.Tensor] = [t.detach().clone() for t in self._copied_live]
        self.step = 0
        self._groups = group_tensors(self.shadow, self._live)
        # Counts the updates, at once or when their outcome (made or skipped for a NaN/inf) arrives.
        self._record = UpdateRecord(config.on_nonfinite, self._tensor_name)
        # Steps whose update was coalesced into the next one (the background fold of an offloaded EMA was busy).
        self._coalesced_steps = 0
        #: BEMA's correction (`EMAConfig(bema=...)`): the snapshot theta_0 and the corrected weights; else None.
        bema = config.bema_config
        self.bias_correction = BiasCorrection(bema, self.shadow, self._live) if bema is not None else None
        #: True while `swapped()` has the EMA weights in the model.
        self.is_swapped = False
        # Picks the kernel per group and runs offloaded / side-stream updates (see `hf_ema/updater.py`).
        self._updater = updater = EMAUpdater([(g.ema, g.live) for g in self._groups], config)
        updater.on_outcome = self._record.record
        agreements = agreements_for(
            self.layout, updater.check, updater.in_background, updater.device_update is not None
        )
        updater.set_agreement(agreements.skip)
        updater.set_device_reduce(agreements.device_skip)
        self._any_busy = agreements.any_busy

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

    # ------------------------------------------------------------------ counters
    def _settled(self) -> Counters:
        # Outcomes still on their way (decided on the device, or folded in the background) are fetched when a
        # counter is read: a host synchronisation only then (logging, saving), never in `update()`.
        if self._record.pending:
            self._updater.wait()
        return self._record.counters

    def _tensor_name(self, position: tuple[int, int]) -> str:
        gid, index = position
        return self.names[self._groups[gid].indices[index]]

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
        return self._record.counters.last_interval

    @property
    def coalesces(self) -> bool:
        """Whether updates may be coalesced: the EMA is offloaded and folded in the background (`device="cpu"`)."""
        return self._updater.in_background

    @property
    def update_intervals(self) -> dict[int, int]:
        """How many updates covered each interval, in optimizer steps (`{update_every: n}` unless updates were
        coalesced; saved in `ema_state.json`)."""
        return dict(self._record.counters.intervals)

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
        return self._record_update(self._updater.copy_now(step=self.step), 0.0, is_copy=True)

    def _fold(self, t: int, interval: int) -> bool:
        """The update at `t` steps after `start_step`, covering the last `interval` optimizer steps."""
        self._coalesced_steps = 0
        correction = self.bias_correction
        if correction is not None and not correction.ready:
            # BEMA's theta_0: the EMA still holds the weights of the burn-in step, which it copied last.
            with self._updater.after_queued():
                correction.snapshot(self.shadow)
        beta = self.config.decay_at(t, interval=interval)
        self._record.interval(interval)
        return self._record_update(self._updater.fold(1.0 - beta, step=self.step), beta)

    def _record_update(self, outcome: FoldOutcome | None, beta: float, is_copy: bool = False) -> bool:
        """Count an update (or a copy, `beta` 0) as queued, when its outcome comes later, or as made, and copy the
        non-averaged tensors with it; an update known at once to be skipped (NaN/inf) changes nothing."""
        if self._updater.defers_outcomes:
            self._record.queued(self.step, beta, is_copy=is_copy)
        elif outcome is not None and not outcome.folded:
            return False
        else:
            self._record.made(beta, is_copy=is_copy)
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
    def model_weights(self) -> Iterator[tuple[EMATensor, torch.Tensor]]:
        """Each EMA tensor with the values the model gets from it: the EMA itself, or for a bias-corrected EMA
        (`EMAConfig(bema=...)`) of an averaged tensor BEMA's `ema + alpha_t * (theta_t - theta_0)`, formed now from
        the current weights (a new tensor, one at a time). This rank's parts; call `wait()` first.

        Yields:
            `tuple[EMATensor, torch.Tensor]`: the tensor and its values, in the EMA's dtype on its device.
        """
        correction = self.bias_correction
        alpha = correction.alpha(self.step) if correction is not None else 0.0
        for i, t in enumerate(self.named_tensors()):
            yield t, correction.corrected(i, t.ema, t.live, alpha) if correction is not None and t.averaged else t.ema

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite the model's weights with the EMA (cast to the model's dtype).

        Args:
            model (`nn.Module`, *optional*): Another model with the same parameter names; defaults to the tracked one.
        """
        self.wait()
        if model is not None and unwrap_model(model) is not self.model and self.layout.is_sharded:
            self._copy_full_to(unwrap_model(model))
            return
        state = None if model is None or unwrap_model(model) is self.model else self._tensors_of(unwrap_model(model))
        written = []
        # One tensor at a time: BEMA's values of a tensor are formed from its raw weights just before they are
        # overwritten, and no other tensor's values are held meanwhile.
        for t, values in self.model_weights():
            dst = t.live if state is None else self.layout.local(t.name, state[t.name])
            dst.copy_(values)
            written.append(dst)
        # A DDP-sharded EMA wrote only this rank's chunks: the layout exchanges them (a collective).
        self.layout.after_write(written)

    @torch.no_grad()
    def _copy_full_to(self, other: nn.Module) -> None:
        # Another, unsharded model (e.g. one for evaluation on every rank): gather one full tensor at a time.
        state = self._tensors_of(other)
        for t, values in self.model_weights():
            full = self.layout.full_tensor(t.name, values, all_ranks=True)
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
        if self.bias_correction is not None:
            # BEMA's weights are formed from the raw weights: keep those, then write the corrected ones.
            for t, values in self.model_weights():
                if t.averaged:
                    backup.append(t.live.clone())
                    t.live.copy_(values)
            self.layout.after_write([t.live for t in averaged])
            return backup
        for t in averaged:
            if t.live.dtype == t.ema.dtype and t.live.device == t.ema.device:
                _exchange(t)
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
                _exchange(t)
            else:
                t.live.copy_(saved)
        self.layout.after_write([t.live for t in averaged])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The EMA state: this rank's tensors by name, plus step counters and config.

        Returns:
            `dict`: `{"tensors": {name: tensor}, "step": int, "num_updates": int, "num_skipped": int,
            "decay": float | None, "update_intervals": {str: int}, "config": dict, "config_history": list,
            "format_version": int}` (and `"bema_theta0": {name: tensor}` for a bias-corrected EMA after its burn-in).
        """
        self.wait()
        state = {
            "tensors": {t.name: t.ema for t in self.named_tensors()},
            "step": self.step,
            **self.counter_state(),
            "config": self.config.to_dict(),
            "config_history": [dict(entry) for entry in self.config_history],
            "format_version": STATE_FORMAT_VERSION,
        }
        correction = self.bias_correction
        if correction is not None and correction.ready:  # BEMA's snapshot theta_0, for an exact resume
            state["bema_theta0"] = dict(zip(self.names, correction.theta0))
        return state

    def counter_state(self) -> dict[str, Any]:
        """The counters an exact resume restores, as JSON-ready values: `num_updates`, `num_skipped`, `decay` (the
        last update's beta), `update_intervals` (`{interval in steps (as str): updates}`) and `last_interval`."""
        return self._settled().to_state()

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
        if self.bias_correction is not None:
            self.bias_correction.load(state.get("bema_theta0"), self.names, self._live, strict)
        self.step = int(state.get("step", self.step))
        self._record.counters.load_state(state)
        self._coalesced_steps = 0
        if "config_history" in state:
            self.config_history = [dict(entry) for entry in state["config_history"]]

    def reset(self) -> None:
        """Restart the EMA from the model's current weights (keeps the step counter). Weights holding NaN or inf
        are not copied (see `EMAConfig.on_nonfinite`); for a sharded EMA on several ranks that check is a
        collective call."""
        self._coalesced_steps = 0
        if self.bias_correction is not None:
            self.bias_correction.ready = False  # a new theta_0 at the next update
        with torch.no_grad():
            outcome = self._updater.copy_now(step=self.step)
            if outcome is None or outcome.folded:
                copy_(self.copied, self._copied_live)

    @torch.no_grad()
    def full_state_dict(self, dtype: str | torch.dtype = "model") -> dict[str, torch.Tensor] | None:
        """The full (unsharded) EMA tensors by name, gathered one tensor at a time onto the main process: the values
        the model gets from the EMA (BEMA's corrected weights for a bias-corrected EMA, see `model_weights()`).

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
        for t, values in self.model_weights():
            full = self.layout.full_tensor(t.name, values)
            if out is None or full is None:
                continue
            # A copied tensor (an integer buffer) keeps its dtype.
            target = (fixed or (t.live.dtype if dtype == "model" else t.ema.dtype)) if t.averaged else t.ema.dtype
            out[t.name] = full.detach().to("cpu", dtype=target, copy=True)
        return out

    def num_bytes(self) -> int:
        """Bytes of EMA tensors held by this rank (BEMA's snapshot theta_0 included)."""
        extra = self.bias_correction.num_bytes() if self.bias_correction is not None else 0
        return extra + sum(t.ema.numel() * t.ema.element_size() for t in self.named_tensors())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tensors={len(self.names)}, step={self.step}, updates={self.num_updates}, "
            f"dtype={self.config.dtype}, layout={self.layout.kind})"
        )


def _exchange(t: EMATensor) -> None:
    # Exact in-place exchange of the weights and the EMA (same dtype and device) through one tensor-sized temporary.
    tmp = t.live.clone()
    t.live.copy_(t.ema)
    t.ema.copy_(tmp)

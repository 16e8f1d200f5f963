"""Training-stability signals that tell whether an EMA is worth it: how far the weights are from their EMA, and how
often they oscillate.

Both work on the tensors a rank holds (its local shards) and sum their statistics across ranks with
`torch.distributed` when a process group is initialised, so they need no gather of a sharded model. Neither depends
on `Trainer`: `EMACallback(stability_metrics=True)` drives them, any training loop can too.

- `relative_distance(live, ema)`: `||theta - ema|| / ||ema||` over all tensors.
- `OscillationTracker`: the oscillation frequency of Nagel et al. 2022 ("Overcoming Oscillations in
  Quantization-Aware Training") applied to the sign of each weight's update, on a fixed random sample of weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .compat.torch import foreach_norm, foreach_sub
from .errors import ConfigError
from .sharding.collectives import all_reduce_sum
from .utils.validation import check_bool, check_int, check_number, coerce_config

__all__ = [
    "STABILITY_DIRNAME",
    "OscillationTracker",
    "StabilityConfig",
    "StabilityMonitor",
    "all_reduce_sum",
    "relative_distance",
]

logger = logging.getLogger(__name__)

#: Folder of a checkpoint (beside `ema/`) that holds each rank's oscillation-tracker state, for an exact resume.
from .utils.paths import STABILITY_DIRNAME  # noqa: E402  (re-exported)


@torch.no_grad()
def relative_distance(
    live: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], reduce: bool | None = None, eps: float = 1e-12
) -> float:
    """`||theta - ema|| / ||ema||`, the norms taken over all tensors together (one flat vector).

    Computed on the local tensors in float32 (per-tensor norms, summed in float64), then the two squared
    norms are summed across ranks. With replicated tensors (DDP) every rank contributes the same amount to both
    sums, so the ratio is unchanged; with sharded tensors the sums add the shards up.

    Args:
        live (`Sequence[torch.Tensor]`): The current weights (or this rank's shards of them).
        ema (`Sequence[torch.Tensor]`): The EMA tensors, same shapes.
        reduce (`bool`, *optional*): See [`all_reduce_sum`].
        eps (`float`, *optional*, defaults to 1e-12): Guards the division when the EMA is all zeros.

    Returns:
        `float`: the relative distance (0 when the weights equal their EMA).
    """
    if len(live) != len(ema):
        raise ConfigError(f"`live` and `ema` must have the same length, got {len(live)} and {len(ema)}")
    # ||theta - ema||_2 / ||ema||_2 over the concatenation of all tensors (hf-ema's metric, not a paper's).
    # Multi-tensor passes per (device, dtype) group: a few kernel launches instead of several per tensor.
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for theta, avg in zip(live, ema):
        if theta.numel() == 0 or not avg.is_floating_point():
            continue
        avg32 = avg if avg.dtype == torch.float32 else avg.float()
        theta32 = theta.to(device=avg32.device, dtype=torch.float32)
        pair = groups.setdefault((avg32.device,), ([], []))
        pair[0].append(theta32)
        pair[1].append(avg32)
    diff_sq = 0.0
    ema_sq = 0.0
    for thetas, avgs in groups.values():
        diffs = foreach_sub(thetas, avgs)
        diff_sq += torch.stack(foreach_norm(diffs)).double().square().sum().item()
        ema_sq += torch.stack(foreach_norm(avgs)).double().square().sum().item()
    diff_sq, ema_sq = all_reduce_sum([diff_sq, ema_sq], reduce=reduce)
    return math.sqrt(diff_sq) / max(math.sqrt(ema_sq), eps)


@dataclass
class StabilityConfig:
    """Settings of the stability metrics that `EMACallback(stability_metrics=...)` logs.

    Args:
        relative_distance (`bool`, *optional*, defaults to `True`): Log `ema_rel_distance`.
        oscillation (`bool`, *optional*, defaults to `True`): Track and log the oscillation frequency.
        sample_size (`int`, *optional*, defaults to 4096): Weights sampled (uniformly, without replacement, over all
            averaged tensors of this rank) for the oscillation frequency.
        momentum (`float`, *optional*, defaults to 0.01): `m` in `f_t = m * o_t + (1 - m) * f_{t-1}`, in (0, 1]. Keep
            it 2-3x below `threshold` (Nagel et al. use 0.001-0.01).
        threshold (`float`, *optional*, defaults to 0.1): A weight oscillates when its frequency exceeds this, in
            (0, 1].
        seed (`int`, *optional*, defaults to 0): Seed of the sample (the same on every rank).
    """

    relative_distance: bool = True
    oscillation: bool = True
    sample_size: int = 4096
    momentum: float = 0.01
    threshold: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_bool("relative_distance", self.relative_distance)
        check_bool("oscillation", self.oscillation)
        check_int("sample_size", self.sample_size, minimum=1)
        check_int("seed", self.seed)
        check_number("momentum", self.momentum, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_number("threshold", self.threshold, minimum=0.0, maximum=1.0, min_inclusive=False)

    @classmethod
    def coerce(cls, value: bool | StabilityConfig | dict | None) -> StabilityConfig | None:
        """`None` for off, a config otherwise (from `True`, a dict of fields, or a config).

        Args:
            value (`bool`, `dict`, `StabilityConfig` or `None`): What the user passed.
        """
        return coerce_config("stability_metrics", value, cls)


class OscillationTracker:
    """Oscillation frequency of a fixed random sample of weights (Nagel et al. 2022, applied to weight updates).

    At every `update()` each sampled weight's change `delta_t = w_t - w_{t-1}` is compared with its last nonzero
    change: `o_t = 1` when `delta_t != 0`, a previous nonzero change exists, and the signs differ, else 0. The
    frequency is `f_t = m * o_t + (1 - m) * f_{t-1}`, starting at 0 (so it needs about `1 / m` updates to warm
    up, as in the paper). A weight oscillates when `f_t > threshold`.

    Cost per update: one `index_select` per tensor into a flat buffer of `sample_size` values, then a handful of
    element-wise ops on that buffer.

    ```python
    tracker = OscillationTracker([p for p in model.parameters()], sample_size=4096)
    for batch in loader:
        ...
        optimizer.step()
        tracker.update()
    print(tracker.summary())  # {"ema_osc_frac": ..., "ema_osc_freq_mean": ...}
    ```

    Args:
        tensors (`Sequence[torch.Tensor]`): The weights to watch (this rank's local shards; read, never written).
        sample_size (`int`, *optional*, defaults to 4096): Number of weights sampled over all tensors (all of them
            when there are fewer; a few less when random draws repeat).
        momentum (`float`, *optional*, defaults to 0.01): `m` above.
        threshold (`float`, *optional*, defaults to 0.1): Oscillation threshold on `f`.
        seed (`int`, *optional*, defaults to 0): Seed of the sample.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        sample_size: int = 4096,
        momentum: float = 0.01,
        threshold: float = 0.1,
        seed: int = 0,
    ) -> None:
        StabilityConfig(sample_size=sample_size, momentum=momentum, threshold=threshold)  # validates
        self.momentum = float(momentum)
        self.threshold = float(threshold)
        watched = [t for t in tensors if t.is_floating_point() and t.numel() > 0]
        sizes = [t.numel() for t in watched]
        total = sum(sizes)
        n = min(int(sample_size), total)
        gen = torch.Generator().manual_seed(int(seed))
        # Uniform over all weights: positions in the concatenation of the flattened tensors, sorted so each
        # tensor's indices are contiguous in the buffer. A permutation of a billion-weight model would not fit in
        # memory: draw with replacement and drop the (rare) repeats instead.
        if total <= 4 * n:
            flat_idx = torch.randperm(total, generator=gen)[:n].sort().values
        else:
            flat_idx = torch.randint(total, (n,), generator=gen).unique(sorted=True)
        n = flat_idx.numel()
        self._views: list[torch.Tensor] = []
        self._index: list[torch.Tensor] = []
        self._slices: list[tuple[int, int]] = []
        offset = 0
        pos = 0
        for t, size in zip(watched, sizes):
            lo = int(torch.searchsorted(flat_idx, offset))
            hi = int(torch.searchsorted(flat_idx, offset + size))
            if hi > lo:
                self._views.append(t.detach().reshape(-1))
                self._index.append((flat_idx[lo:hi] - offset).to(t.device))
                self._slices.append((pos, pos + hi - lo))
                pos += hi - lo
            offset += size
        self.num_sampled = n
        self.num_watched = total
        device = watched[0].device if watched else torch.device("cpu")
        self._current = torch.zeros(n, dtype=torch.float32, device=device)
        self._previous: torch.Tensor | None = None
        self._last_sign = torch.zeros(n, dtype=torch.int8, device=device)
        self.frequency = torch.zeros(n, dtype=torch.float32, device=device)
        self.num_updates = 0

    def _gather(self) -> torch.Tensor:
        for view, index, (lo, hi) in zip(self._views, self._index, self._slices):
            self._current[lo:hi] = view.index_select(0, index).to(self._current.device, torch.float32)
        return self._current

    @torch.no_grad()
    def update(self) -> None:
        """Read the sampled weights and fold this step's oscillations into the frequency. Call after each step."""
        current = self._gather()
        if self._previous is None:
            self._previous = current.clone()
            return
        sign = torch.sign(current - self._previous).to(torch.int8)
        # Nagel et al. 2022's oscillation indicator, on the sign of each weight's update: o_t = 1 when the weight
        # moves and in the opposite direction to its last nonzero move, else 0.
        oscillated = (sign != 0) & (self._last_sign != 0) & (sign != self._last_sign)
        # ...and their oscillation frequency, an EMA of it: f_t = m * o_t + (1 - m) * f_{t-1}.
        self.frequency.mul_(1.0 - self.momentum).add_(oscillated.to(torch.float32), alpha=self.momentum)
        # The last nonzero move only changes when the weight moves.
        self._last_sign = torch.where(sign != 0, sign, self._last_sign)
        self._previous.copy_(current)
        self.num_updates += 1

    def _fingerprint(self) -> dict[str, int]:
        return {"num_sampled": self.num_sampled, "num_watched": self.num_watched, "num_tensors": len(self._views)}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state that makes a resumed tracker continue exactly: the frequencies, the last nonzero move of each
        sampled weight, and their values at the last update.

        Returns:
            `tuple[dict[str, torch.Tensor], dict[str, str]]`: CPU tensors and string metadata, as safetensors takes
            them.
        """
        tensors = {"frequency": self.frequency.cpu(), "last_sign": self._last_sign.cpu()}
        if self._previous is not None:
            tensors["previous"] = self._previous.cpu()
        meta = {**{k: str(v) for k, v in self._fingerprint().items()}, "num_updates": str(self.num_updates)}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Restore a state written by [`~OscillationTracker.state_dict`] for the same sample.

        Args:
            tensors (`dict[str, torch.Tensor]`): The tensors.
            meta (`dict[str, str]`): The metadata.

        Raises:
            `ConfigError`: when the state belongs to another sample (other weights, sample size or sharding).
        """
        saved = {k: int(meta.get(k, -1)) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise ConfigError(
                f"oscillation state of another sample: saved {saved}, this tracker {self._fingerprint()}"
            )
        device = self.frequency.device
        self.frequency.copy_(tensors["frequency"].to(device))
        self._last_sign.copy_(tensors["last_sign"].to(device))
        previous = tensors.get("previous")
        self._previous = previous.to(device).clone() if previous is not None else None
        self.num_updates = int(meta["num_updates"])

    def summary(self, reduce: bool | None = None, prefix: str = "ema_osc_") -> dict[str, float]:
        """The frequencies summarised over the sample (and over ranks when reducing).

        Args:
            reduce (`bool`, *optional*): See [`all_reduce_sum`].
            prefix (`str`, *optional*, defaults to `"ema_osc_"`): Prefix of the keys.

        Returns:
            `dict[str, float]`: `{prefix}frac` (fraction of sampled weights with `f > threshold`) and
            `{prefix}freq_mean` (mean `f`).
        """
        above = float((self.frequency > self.threshold).sum().item())
        total_f = float(self.frequency.sum().item())
        above, total_f, count = all_reduce_sum([above, total_f, float(self.num_sampled)], reduce=reduce)
        count = max(count, 1.0)
        return {f"{prefix}frac": above / count, f"{prefix}freq_mean": total_f / count}


class StabilityMonitor:
    """The stability metrics of one `ModelEMA`, as `EMACallback(stability_metrics=...)` logs them.

    Call `step(ema)` after every EMA update and `metrics(ema)` at logging steps. The oscillation sample is drawn on
    the first `step` (again when handed a new `ModelEMA`, e.g. a second `train()`), from the EMA's averaged tensors.

    Args:
        config (`StabilityConfig`, *optional*): The settings; defaults to `StabilityConfig()`.
    """

    def __init__(self, config: StabilityConfig | None = None) -> None:
        self.config = config if config is not None else StabilityConfig()
        self.tracker: OscillationTracker | None = None
        self._ema_id: int | None = None

    def step(self, ema) -> None:
        """Fold the current weights into the oscillation frequency.

        Args:
            ema (`ModelEMA`): The EMA whose tracked weights are watched.
        """
        if not self.config.oscillation:
            return
        self._tracker_for(ema).update()

    def _tracker_for(self, ema) -> OscillationTracker:
        if self.tracker is None or self._ema_id != id(ema):
            cfg = self.config
            self.tracker = OscillationTracker(
                ema.live_tensors,
                sample_size=cfg.sample_size,
                momentum=cfg.momentum,
                threshold=cfg.threshold,
                seed=cfg.seed,
            )
            self._ema_id = id(ema)
        return self.tracker

    def save(self, folder: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path | None:
        """Write this rank's oscillation-tracker state to `folder` (one file per rank, written atomically; not a
        collective). Nothing is written before the tracker has started.

        Args:
            folder (`str` or `os.PathLike`): The state folder, `checkpoint-N/ema_stability/` under `EMACallback`.
            rank (`int`, *optional*, defaults to 0): This process's rank.
            world_size (`int`, *optional*, defaults to 1): Number of processes.

        Returns:
            `Path` or `None`: the file written.
        """
        if self.tracker is None:
            return None
        from .sharding.rank_files import rank_file_name, save_file_atomic

        tensors, meta = self.tracker.state_dict()
        meta["config"] = json.dumps(self._sample_settings())
        return save_file_atomic(tensors, Path(folder) / rank_file_name(rank, world_size), meta)

    def _sample_settings(self) -> dict[str, float | int]:
        # The settings a saved state must share with this monitor to be continued.
        return {"sample_size": self.config.sample_size, "seed": self.config.seed, "momentum": self.config.momentum}

    def restore(self, ema, folder: str | os.PathLike, rank: int = 0, world_size: int = 1) -> bool:
        """Continue the oscillation frequencies saved by [`~StabilityMonitor.save`] for this rank, when the file
        exists and belongs to the same sample (same weights, settings and number of processes); otherwise they
        start again from zero, with an info message. Not a collective.

        Args:
            ema (`ModelEMA`): The EMA whose tracked weights are watched.
            folder (`str` or `os.PathLike`): The state folder.
            rank (`int`, *optional*, defaults to 0): This process's rank.
            world_size (`int`, *optional*, defaults to 1): Number of processes.

        Returns:
            `bool`: whether the state was restored.
        """
        if not self.config.oscillation:
            return False
        from safetensors import safe_open

        from .sharding.rank_files import rank_file_name

        path = Path(folder) / rank_file_name(rank, world_size)
        if not path.is_file():
            logger.info("No oscillation state at %s: the oscillation frequencies start again from zero", path)
            return False
        current = self._sample_settings()
        tracker = self._tracker_for(ema)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
            saved_config = json.loads(meta.get("config", "{}"))
            if saved_config != current:
                raise ConfigError(f"saved with {saved_config}, now {current}")
            tracker.load_state_dict(tensors, meta)
        except Exception as err:  # a metric's state must never stop a resume: unreadable or foreign means restart
            logger.info("Oscillation state at %s not restored (%s): the frequencies start again from zero", path, err)
            self.tracker = None
            self._tracker_for(ema)  # a fresh one, whatever a partial load left
            return False
        return True

    def metrics(self, ema) -> dict[str, float]:
        """`ema_rel_distance`, `ema_osc_frac` and `ema_osc_freq_mean` (those enabled). A collective call under
        `torch.distributed`: every rank must make it.

        Args:
            ema (`ModelEMA`): The EMA.
        """
        out: dict[str, float] = {}
        if self.config.relative_distance:
            out["ema_rel_distance"] = relative_distance(ema.live_tensors, ema.shadow)
        if self.config.oscillation and self.tracker is not None and self._ema_id == id(ema):
            out.update(self.tracker.summary())
        return out

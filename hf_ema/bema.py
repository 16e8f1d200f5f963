"""BEMA, the bias-corrected EMA: its settings (`BEMAConfig`), and its correction of an EMA (`BiasCorrection`: the
snapshot `theta_0` and the corrected weights).

Block & Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" (arXiv 2508.00180),
Algorithm 1: `bema_t = ema_t + alpha_t * (theta_t - theta_0)`, `alpha_t = (rho + gamma * t) ** -eta`, `t` counting
optimizer steps since the burn-in `tau`, where `theta_0` is the weights at `tau`. The EMA itself follows BEMA's
schedule through `EMAConfig.decay_at`; this module only adds the correction, which is formed when the weights are
used (evaluation, saving, `swapped()`, `copy_to()`), never at a training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .decay import bema_alpha, bema_weight
from .errors import CheckpointError, ConfigError
from .utils.validation import check_int, check_number

__all__ = ["BEMAConfig", "BiasCorrection"]


@dataclass
class BEMAConfig:
    """Bias-corrected EMA (BEMA; Block & Zhang 2025, "EMA Without the Lag", arXiv 2508.00180): the EMA lags the
    weights, and BEMA adds back a decaying share of the distance they travelled since the burn-in:

    `bema_t = ema_t + alpha_t * (theta_t - theta_0)`, `alpha_t = (rho + gamma * t) ** -eta`, and the EMA's weight on
    the newest step is `w_t = max((rho + gamma * t) ** -kappa, min_weight)` (its decay is `1 - w_t`). `t` counts
    optimizer steps since the burn-in step `tau`, as the paper's Algorithm 1 does; up to and including `tau` the
    EMA copies the weights, and `theta_0` is the weights at `tau`. With an update every `k` steps
    (`update_every`), an update uses `(1 - w_t) ** k`.

    The defaults are the paper's and trl's. trl's `BEMACallback` evaluates its schedule at the global step instead
    of `t`: [`BEMAConfig.from_trl`] maps its arguments so that the two agree exactly for any `update_after`.

    Args:
        eta (`float`, *optional*, defaults to 0.2): The bias power (trl: `bias_power`), >= 0; 0 turns the
            correction into a constant `theta_t - theta_0`.
        kappa (`float`, *optional*, defaults to 0.5): The EMA power (trl: `ema_power`), >= 0.
        rho (`float`, *optional*, defaults to 10.0): The lag (trl: `lag`), > 0.
        gamma (`float`, *optional*, defaults to 1.0): The multiplier (trl: `multiplier`), >= 0.
        tau (`int`, *optional*, defaults to 0): The burn-in step (trl: `update_after`), >= 0.
        min_weight (`float`, *optional*, defaults to 0.0): Floor of the EMA weight `w_t` (trl:
            `min_ema_multiplier`), in [0, 1].
    """

    eta: float = 0.2
    kappa: float = 0.5
    rho: float = 10.0
    gamma: float = 1.0
    tau: int = 0
    min_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("eta", "kappa", "rho", "gamma", "min_weight"):
            check_number(f"bema.{name}", getattr(self, name))
        for name in ("eta", "kappa", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`bema.{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.rho <= 0:
            raise ConfigError(f"`bema.rho` must be > 0, got {self.rho!r}")
        if not 0.0 <= self.min_weight <= 1.0:
            raise ConfigError(f"`bema.min_weight` must be in [0, 1], got {self.min_weight!r}")
        check_int("bema.tau", self.tau, minimum=0)

    @classmethod
    def from_trl(
        cls,
        bias_power: float = 0.2,
        ema_power: float = 0.5,
        lag: float = 10.0,
        multiplier: float = 1.0,
        update_after: int = 0,
        min_ema_multiplier: float = 0.0,
    ) -> BEMAConfig:
        """The BEMA of trl's `BEMACallback` with these arguments (and `update_freq=1`).

        trl evaluates `(lag + multiplier * step) ** -power` at the global step, hf-ema at `t = step - tau`: the lag
        is shifted by `multiplier * update_after` so that both give the same weights at every step.

        Args:
            bias_power (`float`, *optional*, defaults to 0.2): trl's `bias_power` (`eta`).
            ema_power (`float`, *optional*, defaults to 0.5): trl's `ema_power` (`kappa`).
            lag (`float`, *optional*, defaults to 10.0): trl's `lag` (`rho` at `update_after=0`).
            multiplier (`float`, *optional*, defaults to 1.0): trl's `multiplier` (`gamma`).
            update_after (`int`, *optional*, defaults to 0): trl's `update_after` (`tau`).
            min_ema_multiplier (`float`, *optional*, defaults to 0.0): trl's `min_ema_multiplier` (`min_weight`).
        """
        return cls(
            eta=bias_power,
            kappa=ema_power,
            rho=lag + multiplier * update_after,
            gamma=multiplier,
            tau=update_after,
            min_weight=min_ema_multiplier,
        )

    def weight(self, t: int) -> float:
        """The EMA's weight `w_t` on the newest weights, `t` steps after `tau`.

        Args:
            t (`int`): Optimizer steps since `tau`.
        """
        return bema_weight(t, self.kappa, self.rho, self.gamma, self.min_weight)

    def alpha(self, t: int) -> float:
        """The bias-correction weight `alpha_t`, `t` steps after `tau`.

        Args:
            t (`int`): Optimizer steps since `tau`.
        """
        return bema_alpha(t, self.eta, self.rho, self.gamma)


class BiasCorrection:
    """`theta_0` for each averaged tensor (this rank's shard, in the weights' own dtype, where the EMA lives) and the
    corrected weights built from it.

    Args:
        config (`BEMAConfig`): The BEMA settings.
        ema (`Sequence[torch.Tensor]`): The EMA tensors (the snapshot is kept on their device).
        live (`Sequence[torch.Tensor]`): The weights they average, same order (the snapshot takes their dtype).
    """

    def __init__(self, config: BEMAConfig, ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor]) -> None:
        self.config = config
        # A snapshot is exact in the weights' dtype: a bf16 model pays 2 bytes per parameter for it, not 4.
        self.theta0 = [torch.empty(w.shape, dtype=w.dtype, device=e.device) for e, w in zip(ema, live)]
        #: Whether `theta0` holds the snapshot (taken at the first update after the burn-in, or restored).
        self.ready = False

    @torch.no_grad()
    def snapshot(self, ema: Sequence[torch.Tensor]) -> None:
        """Take `theta_0` from the EMA, which at the first update after the burn-in still holds the weights of step
        `tau` exactly (it copied them up to then, skipping any that held NaN/inf).

        Args:
            ema (`Sequence[torch.Tensor]`): The EMA tensors, in the order of the constructor's.
        """
        for dst, src in zip(self.theta0, ema):
            dst.copy_(src)  # exact: the EMA holds weights of the dtype being cast back to
        self.ready = True

    def alpha(self, step: int) -> float:
        """`alpha_t` at optimizer step `step`; 0 before the snapshot (the EMA then equals the weights it copied).

        Args:
            step (`int`): The optimizer step.
        """
        t = step - self.config.tau
        return self.config.alpha(t) if self.ready and t > 0 else 0.0

    @torch.no_grad()
    def corrected(self, index: int, ema: torch.Tensor, live: torch.Tensor, alpha: float) -> torch.Tensor:
        """The corrected weights of averaged tensor `index`: `ema + alpha * (live - theta_0)`, in the EMA's dtype on
        its device: a new tensor, or at `alpha == 0` (before the snapshot) the EMA itself. Read it, never write it.

        Args:
            index (`int`): The tensor's position among the averaged tensors.
            ema (`torch.Tensor`): Its EMA.
            live (`torch.Tensor`): The current weights.
            alpha (`float`): `alpha_t` (see `alpha()`).
        """
        if alpha == 0.0:
            return ema
        # Block & Zhang 2025, Alg. 1: mu = alpha_t * (theta_t - theta_0) + mu_EMA.
        out = live.to(device=ema.device, dtype=ema.dtype, copy=True)
        out.sub_(self.theta0[index])
        return out.mul_(alpha).add_(ema)

    @torch.no_grad()
    def load(
        self, theta0: dict[str, torch.Tensor] | None, names: Sequence[str], live: Sequence[torch.Tensor], strict: bool
    ) -> None:
        """Restore the snapshot from a state (`None`: saved during the burn-in, no snapshot yet).

        Args:
            theta0 (`dict[str, torch.Tensor]`, *optional*): `theta_0` by tensor name (this rank's parts).
            names (`Sequence[str]`): The averaged tensors' names, in order.
            live (`Sequence[torch.Tensor]`): Their weights (a tensor `theta0` lacks takes the current weights).
            strict (`bool`): Fail when `theta0` lacks a tensor (else it is one the resumed run adds).
        """
        self.ready = theta0 is not None
        if theta0 is None:
            return
        missing = [name for name in names if name not in theta0]
        if missing and strict:
            raise CheckpointError(f"the BEMA state lacks theta_0 of {len(missing)} tensors, e.g. {missing[:3]!r}")
        for name, dst, weights in zip(names, self.theta0, live):
            src = theta0.get(name, weights)
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"BEMA theta_0 of {name!r} has shape {tuple(src.shape)} in the state, {tuple(dst.shape)} here"
                )
            dst.copy_(src)

    def num_bytes(self) -> int:
        """Bytes of the snapshot held by this rank."""
        return sum(t.numel() * t.element_size() for t in self.theta0)

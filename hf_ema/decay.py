"""Decay schedules: the `beta` an EMA update uses at a given optimizer step.

Pure functions of numbers, no torch, so they are easy to test against the formulas in the docs. Each one names the
equation it implements: EDM2 is Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models" (equation numbers of its appendix, as in NVlabs/edm2 `training/phema.py`); the warmup schedule is the one
of diffusers' `EMAModel` and ema-pytorch (`@lucidrains`), after Tarvainen & Valpola's "mean teacher" ramp; BEMA is
Block & Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" (arXiv 2508.00180, Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError
from .utils.validation import is_number

__all__ = [
    "bema_alpha",
    "bema_weight",
    "MAX_SIGMA_REL",
    "MIN_SIGMA_REL",
    "check_sigma_rel",
    "decay_from_half_life",
    "gamma_from_sigma_rel",
    "power_function_beta",
    "sigma_rel_from_gamma",
    "warmup_decay",
]


def decay_from_half_life(half_life: float) -> float:
    """Per-step decay whose weight on a past step halves every `half_life` steps: `0.5 ** (1 / half_life)`.

    Args:
        half_life (`float`): Half-life in optimizer steps, > 0.
    """
    # Classic EMA: the weight of step t - h is beta**h = 1/2.
    return 0.5 ** (1.0 / half_life)


#: EDM2's power-function profile is only defined for 0 < sigma_rel < sqrt(1/12) (gamma > -1; gamma = 0 is the uniform
#: average at sigma_rel ~ 0.2887).
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
#: The narrowest profile hf-ema builds: its exponent gamma is about 1 / sigma_rel, 1e9 here, beyond which the profile
#: is the last weights to within float64 and the exponent cannot be solved for.
MIN_SIGMA_REL = 1e-9


def check_sigma_rel(subject: str, value: Any) -> float:
    """`value` as a relative EMA width, or a [`ConfigError`] naming the argument and the value.

    Args:
        subject (`str`): What the value is, for the message (`` "`sigma_rel`" ``, `` "`sigma_rels` entries" ``).
        value (`Any`): The value given.
    """
    if not is_number(value) or not 0.0 < value < MAX_SIGMA_REL:
        raise ConfigError(f"{subject} must be in (0, {MAX_SIGMA_REL:.4f}), got {value!r}")
    if value < MIN_SIGMA_REL:
        raise ConfigError(
            f"{subject} must be at least {MIN_SIGMA_REL:g} (a narrower profile is the last weights to within float64), "
            f"got {value!r}"
        )
    return float(value)


def sigma_rel_from_gamma(gamma: float) -> float:
    """EDM2's relative width of a power-function EMA profile with exponent `gamma`.

    Args:
        gamma (`float`): Exponent of the profile, > -1.
    """
    # EDM2 Eq. 123: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Exponent `gamma` of the power-function profile whose relative width is `sigma_rel`.

    Solves `sigma_rel**2 * (gamma + 2)**2 * (gamma + 3) = gamma + 1` for the root with `gamma >= 0` (EDM2's
    profiles; the cubic has a second root in (-1, 0)). On [0, inf) the width decreases monotonically from
    sqrt(1/12) at gamma = 0 towards 0, so bisection on a bracket there is exact and robust.

    Args:
        sigma_rel (`float`): Relative width, in [`MIN_SIGMA_REL`, `MAX_SIGMA_REL`).

    Raises:
        `ConfigError`: `sigma_rel` is outside that range.
    """
    check_sigma_rel("`sigma_rel`", sigma_rel)
    # EDM2 Eq. 126 (the inverse of Eq. 123), solved by bisection instead of Algorithm 2's cubic root.
    lo, hi = 0.0, 1.0
    # Widen the upper bracket until the width drops below the target (gamma < 2 / MIN_SIGMA_REL always does).
    while sigma_rel_from_gamma(hi) > sigma_rel:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sigma_rel_from_gamma(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def warmup_decay(step: int, decay: float, inv_gamma: float, power: float, min_decay: float = 0.0) -> float:
    """The "start lower, then raise it" decay: `clamp(1 - (1 + step / inv_gamma) ** -power, min_decay, decay)`.

    Args:
        step (`int`): Optimizer steps since the EMA started (>= 0).
        decay (`float`): The ceiling, the decay used once warmed up.
        inv_gamma (`float`): Inverse multiplicative factor of the warmup.
        power (`float`): Exponential factor of the warmup (2/3 for long runs, 3/4 for short ones).
        min_decay (`float`, *optional*, defaults to 0.0): The floor.
    """
    # diffusers `EMAModel.get_decay` / ema-pytorch `EMA.get_current_decay`: 1 - (1 + t / inv_gamma)^-power, clamped.
    value = 1.0 - (1.0 + step / inv_gamma) ** (-power)
    return max(min_decay, min(decay, value))


def power_function_beta(t: int, gamma: float, interval: int = 1) -> float:
    """EDM2 power-function EMA: `beta = (1 - interval / t) ** (gamma + 1)` at step count `t` after this update.

    The first update (`t == interval`) has beta 0, so the EMA starts at the current weights.

    Args:
        t (`int`): Steps since the EMA started, including this update (>= `interval`).
        gamma (`float`): Exponent of the profile.
        interval (`int`, *optional*, defaults to 1): Steps between two updates.
    """
    if t <= 0:
        return 0.0
    # EDM2 Eq. 127: beta = (1 - t_delta / t_next)^(gamma + 1), t counted in optimizer steps.
    return max(0.0, 1.0 - interval / t) ** (gamma + 1.0)


def bema_weight(t: int, kappa: float, rho: float, gamma: float, min_weight: float = 0.0) -> float:
    """BEMA's EMA weight on the newest weights, `w_t = max((rho + gamma * t) ** -kappa, min_weight)`.

    The EMA is `ema_t = (1 - w_t) * ema_{t-1} + w_t * theta_t`: hf-ema's decay is `1 - w_t`.

    Args:
        t (`int`): Optimizer steps since the burn-in step `tau` (>= 1 at the first update).
        kappa (`float`): The EMA power (trl's `ema_power`).
        rho (`float`): The lag (trl's `lag`).
        gamma (`float`): The multiplier (trl's `multiplier`).
        min_weight (`float`, *optional*, defaults to 0.0): The floor (trl's `min_ema_multiplier`).
    """
    # Block & Zhang 2025, Algorithm 1: beta_t = (rho + gamma * (t - tau))^-kappa, t - tau counted from the burn-in.
    return max((rho + gamma * t) ** (-kappa), min_weight)


def bema_alpha(t: int, eta: float, rho: float, gamma: float) -> float:
    """BEMA's bias-correction weight, `alpha_t = (rho + gamma * t) ** -eta`: the corrected weights are
    `ema_t + alpha_t * (theta_t - theta_0)`.

    Args:
        t (`int`): Optimizer steps since the burn-in step `tau`.
        eta (`float`): The bias power (trl's `bias_power`).
        rho (`float`): The lag (trl's `lag`).
        gamma (`float`): The multiplier (trl's `multiplier`).
    """
    # Block & Zhang 2025, Algorithm 1: alpha_t = (rho + gamma * (t - tau))^-eta.
    return (rho + gamma * t) ** (-eta)

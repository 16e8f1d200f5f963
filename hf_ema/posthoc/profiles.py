"""Power-function EMA profiles (EDM2) and the least-squares weights of a post-hoc EMA reconstruction.

Pure numpy, no torch. Notation of Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2; equation numbers of its appendix, as in NVlabs/edm2 `training/phema.py`): a power-function EMA with
exponent `gamma` at time `t` (in optimizer steps since it started) weighs the training weights at time `tau` by
`p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)` on `(0, t]` (EDM2 Eqs. 108 and 121).

**Updates every `k` steps.** With `beta = (1 - k / t) ** (gamma + 1)` at each update (`t = k, 2k, ...`), the EMA
after `m` updates (`t = m k`) gives the weights sampled at step `j k` the weight
`(1 - beta_j) * prod_{l > j} beta_l = (j**(gamma+1) - (j-1)**(gamma+1)) / m**(gamma+1)`,
which is exactly the integral of `p_t` over the cell `((j - 1) k, j k]`. So the discrete EMA is the integral of
`p_t` against the trajectory held constant on each cell, and only the cell averages of a profile matter: the
inner products that the reconstruction needs are those of the cell-averaged (piecewise-constant) profiles,
`<h_a, h_b> = sum_j w_a(j) w_b(j) / k`. [`gram_matrix`] computes them exactly; for `k = 1` and long runs they equal
the closed form of EDM2 (`continuous_inner_product`) to within `O((gamma k / t)**2)`, which is what it falls back to
when the exact sum would be too long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = [
    "cell_weights",
    "continuous_inner_product",
    "gram_matrix",
    "solve_posthoc_weights",
]

# Above this many (profiles x cells) the exact discrete sum is replaced by the closed form; by then each cell is a
# tiny fraction of the profile and the two agree to many digits.
MAX_EXACT_WORK = 50_000_000
_CHUNK = 1 << 16


def continuous_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """EDM2's closed-form L2 inner product of two continuous power-function profiles.

    `(g_a + 1)(g_b + 1) min(t_a, t_b)**(g_a + g_b + 1) / ((g_a + g_b + 1) t_a**(g_a + 1) t_b**(g_b + 1))`,
    computed in logs so large exponents do not overflow.

    Args:
        t_a (`float`): Time of profile a, > 0.
        gamma_a (`float`): Exponent of profile a, > -1.
        t_b (`float`): Time of profile b, > 0.
        gamma_b (`float`): Exponent of profile b, > -1.
    """
    # EDM2 Eq. 151 (Algorithm 3's `power_function_correlation`), in logs.
    s = gamma_a + gamma_b + 1.0
    log = (
        math.log(gamma_a + 1.0)
        + math.log(gamma_b + 1.0)
        - math.log(s)
        + s * math.log(min(t_a, t_b))
        - (gamma_a + 1.0) * math.log(t_a)
        - (gamma_b + 1.0) * math.log(t_b)
    )
    return math.exp(log)


def cell_weights(t: int, gamma: float, interval: int = 1, cells: int | None = None, start: int = 0) -> np.ndarray:
    """Weight of each sampled step in a power-function EMA updated every `interval` steps, at time `t`.

    Entry `j - 1 - start` is the weight of the weights at step `j * interval` (`j = start + 1 ..`), zero past `t`.
    They sum to 1 over all cells.

    Args:
        t (`int`): Steps since the EMA started, a multiple of `interval`.
        gamma (`float`): Exponent of the profile.
        interval (`int`, *optional*, defaults to 1): Steps between two updates.
        cells (`int`, *optional*): Number of cells to return; defaults to `t // interval - start`.
        start (`int`, *optional*, defaults to 0): Index of the first cell returned.
    """
    m = t // interval
    if cells is None:
        cells = m - start
    j = np.arange(start + 1, start + cells + 1, dtype=np.float64)
    out = np.zeros(cells, dtype=np.float64)
    live = j <= m
    jl = j[live]
    g1 = gamma + 1.0
    # The discrete form of EDM2's profile (Eq. 121) for updates with Eq. 127's beta: the weight of cell j is the
    # integral of p_t over ((j - 1) k, j k] (module docstring).
    # (j/m)^(g+1) - ((j-1)/m)^(g+1) = (j/m)^(g+1) * (1 - (1 - 1/j)^(g+1)), the second factor via expm1/log1p so
    # that it stays accurate for large j.
    head = np.exp(g1 * (np.log(jl) - math.log(m)))
    with np.errstate(divide="ignore"):
        tail = -np.expm1(g1 * np.log1p(-1.0 / jl))
    out[live] = head * tail
    return out


def gram_matrix(
    times: Sequence[int], gammas: Sequence[float], interval: int = 1, exact: bool | None = None
) -> np.ndarray:
    """Inner products of the profiles of EMAs updated every `interval` steps.

    Args:
        times (`Sequence[int]`): Time of each profile in steps since the EMAs started (multiples of `interval`).
        gammas (`Sequence[float]`): Exponent of each profile.
        interval (`int`, *optional*, defaults to 1): Steps between two updates.
        exact (`bool`, *optional*): `True` sums over the update cells exactly, `False` uses the continuous closed
            form. Defaults to exact unless that is more than `MAX_EXACT_WORK` operations.

    Returns:
        `np.ndarray`: the `(n, n)` symmetric matrix.
    """
    n = len(times)
    cells = max(int(t) // interval for t in times)
    if exact is None:
        exact = n * cells <= MAX_EXACT_WORK
    if not exact:
        return np.array(
            [
                [continuous_inner_product(ta, ga, tb, gb) for tb, gb in zip(times, gammas)]
                for ta, ga in zip(times, gammas)
            ]
        )
    gram = np.zeros((n, n), dtype=np.float64)
    for start in range(0, cells, _CHUNK):
        size = min(_CHUNK, cells - start)
        block = np.stack([cell_weights(int(t), g, interval, cells=size, start=start) for t, g in zip(times, gammas)])
        gram += block @ block.T
    return gram / interval


def solve_posthoc_weights(
    snapshot_times: Sequence[int],
    snapshot_gammas: Sequence[float],
    target_time: int,
    target_gamma: float,
    interval: int = 1,
    exact: bool | None = None,
) -> tuple[np.ndarray, float]:
    """Least-squares weights `x` with `sum_i x_i * profile_i ~ target profile` (EDM2's post-hoc reconstruction).

    Solves `A x = b` with `A_ij = <p_i, p_j>`, `b_i = <p_i, p_target>` and rescales `x` to sum to 1, as EDM2 does.

    Args:
        snapshot_times (`Sequence[int]`): Time of each snapshot in steps since the EMAs started.
        snapshot_gammas (`Sequence[float]`): Exponent of each snapshot's profile.
        target_time (`int`): Time of the wanted EMA.
        target_gamma (`float`): Exponent of the wanted EMA.
        interval (`int`, *optional*, defaults to 1): Steps between two EMA updates.
        exact (`bool`, *optional*): See [`gram_matrix`].

    Returns:
        `tuple[np.ndarray, float]`: the weights, and the relative L2 error of the fitted profile
        `||sum_i x_i p_i - p_target|| / ||p_target||` (0 is a perfect fit).
    """
    if len(snapshot_times) == 0:
        raise ConfigError("`snapshot_times` must not be empty: there is nothing to reconstruct from")
    times = [int(t) for t in snapshot_times] + [int(target_time)]
    gammas = [float(g) for g in snapshot_gammas] + [float(target_gamma)]
    # EDM2 Algorithm 3: A x = b over the snapshots' profiles, then x normalised to sum to 1.
    gram = gram_matrix(times, gammas, interval, exact)
    a, b = gram[:-1, :-1], gram[:-1, -1]
    # lstsq rather than solve: two snapshots at the same time and gamma would make A singular.
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    err2 = x @ a @ x - 2.0 * x @ b + gram[-1, -1]
    return x, float(math.sqrt(max(err2, 0.0) / gram[-1, -1]))

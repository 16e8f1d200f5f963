"""BEMA's bias correction of an EMA: the snapshot `theta_0` and the corrected weights.

Block & Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" (arXiv 2508.00180),
Algorithm 1: `bema_t = ema_t + alpha_t * (theta_t - theta_0)`, `alpha_t = (rho + gamma * t) ** -eta`, `t` counting
optimizer steps since the burn-in `tau`, where `theta_0` is the weights at `tau`. The EMA itself follows BEMA's
schedule through `EMAConfig.decay_at`; this module only adds the correction, which is formed when the weights are
used (evaluation, saving, `swapped()`, `copy_to()`), never at a training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import BEMAConfig

__all__ = ["BiasCorrection"]


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
        its device (a new tensor; the EMA is not changed).

        Args:
            index (`int`): The tensor's position among the averaged tensors.
            ema (`torch.Tensor`): Its EMA.
            live (`torch.Tensor`): The current weights.
            alpha (`float`): `alpha_t` (see `alpha()`).
        """
        if alpha == 0.0:
            return ema.clone()
        # Block & Zhang 2025, Alg. 1: mu = alpha_t * (theta_t - theta_0) + mu_EMA.
        out = live.to(device=ema.device, dtype=ema.dtype, copy=True)
        out.sub_(self.theta0[index])
        return out.mul_(alpha).add_(ema)

    def num_bytes(self) -> int:
        """Bytes of the snapshot held by this rank."""
        return sum(t.numel() * t.element_size() for t in self.theta0)

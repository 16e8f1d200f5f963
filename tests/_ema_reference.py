"""Reference checks shared by the kernel tests: what an undone (skipped) EMA update must leave behind."""

from __future__ import annotations

import torch


def assert_restored(got: torch.Tensor, before: torch.Tensor, live: torch.Tensor, weight: float) -> None:
    """`got` is `before` again after an update with `weight` from `live` was undone: equal where the weight is not
    finite (never written), elsewhere within the rounding error of the update itself (an fp32 update rounds at the
    scale of |before| + weight * |live - before|; undoing it divides that by 1 - weight)."""
    eps = torch.finfo(torch.float32).eps
    b, x = before.double(), live.double()
    finite = torch.isfinite(x)
    scale = b.abs() + weight * (x - b).abs()
    tol = 2 * eps * torch.where(finite, scale, torch.zeros_like(scale)) / (1 - weight)
    err = (got.double() - b).abs()
    assert bool((err <= tol).all()), float((err - tol).max())
    assert torch.equal(got[~finite], before[~finite])

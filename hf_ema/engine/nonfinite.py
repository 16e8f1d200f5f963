"""The non-finite guard of an update: it is made only when every weight it reads, in every group and on every rank,
is finite; otherwise the EMA is left as it was (`EMAConfig(on_nonfinite="skip" | "raise")`).

One update covers several kernels (one per (device, dtype) group) and, for a sharded EMA, several ranks, each
reading only its own shards: the decision must be the same for all of them, or the shards of the EMA would drift
apart. [`checked_fold`] orders the work so that nothing is written before it is known to be kept, except by the
kernels that fuse the check into the update (the native CPU kernel), which undo their update when a later group or
another rank says skip:

1. the groups whose check is a pass of its own (`all_finite`) are checked, read-only;
2. the fused groups are folded in, each stopping and undoing itself at the first non-finite block;
3. the ranks agree (`agree`: an all-reduce of one flag, for sharded EMAs only); on a skip the fused groups undo;
4. the other groups are folded in.

After a skipped update the next one is checked before it is written (`check_first`): a run whose weights stay NaN
then never writes and undoes the EMA again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .kernels import MAX_UNDO_WEIGHT, LerpKernel, all_finite, first_nonfinite

__all__ = ["Agreement", "FoldOutcome", "NonFiniteGuard"]

#: `agree(local_ok) -> all_ok`: the AND of the flag over every rank that holds part of the EMA (a collective).
Agreement = Callable[[bool], bool]


@dataclass(frozen=True)
class FoldOutcome:
    """What became of one checked update.

    Args:
        step (`int`): The optimizer step of the update.
        folded (`bool`): Whether it was made (all weights finite on every rank).
        bad (`tuple[int, int]`, *optional*): `(group, tensor)` position of the first non-finite tensor found on
            this rank, or `None` (folded, or the non-finite weight is on another rank).
        deferred (`bool`, *optional*, defaults to `False`): Whether the outcome reached the owner after the update
            was queued (an update in the background thread, or decided on the device): the owner counts it then.
    """

    step: int
    folded: bool
    bad: tuple[int, int] | None = None
    deferred: bool = False


class NonFiniteGuard:
    """Runs checked updates over a fixed list of kernels and remembers whether the last one was skipped.

    Args:
        kernels (`Sequence[LerpKernel]`): The kernels of one update.
        group_ids (`Sequence[int]`): The caller's group index of each kernel (reported in `FoldOutcome.bad`).
        agree (`Agreement`, *optional*): The cross-rank agreement; `None` on one rank or a replicated EMA.
    """

    def __init__(
        self, kernels: Sequence[LerpKernel], group_ids: Sequence[int], agree: Agreement | None = None
    ) -> None:
        self.kernels = list(kernels)
        self.group_ids = list(group_ids)
        self.agree = agree
        #: Check the next update before writing it (set after a skip: no repeated write-and-undo while NaN lasts).
        self.check_first = False

    def _agree(self, ok: bool) -> bool:
        return self.agree(ok) if self.agree is not None else ok

    def _bad(self, position: int) -> tuple[int, int]:
        kernel = self.kernels[position]
        index = first_nonfinite(kernel.live)
        return self.group_ids[position], index if index is not None else 0

    def fold(self, weight: float, step: int, run_kernel: Callable[[LerpKernel, float], None] | None = None):
        """One checked update of every kernel.

        Args:
            weight (`float`): The interpolation weight, `1 - beta`.
            step (`int`): The optimizer step (reported in the outcome).
            run_kernel (`Callable`, *optional*): `run_kernel(kernel, weight)` folds a kernel in unchecked (e.g.
                on a CUDA side stream); defaults to `kernel(weight)`.

        Returns:
            `FoldOutcome`.
        """
        fused = weight <= MAX_UNDO_WEIGHT and not self.check_first
        fused_pos = [i for i, k in enumerate(self.kernels) if fused and k.fused_check]
        other_pos = [i for i in range(len(self.kernels)) if i not in set(fused_pos)]
        bad: tuple[int, int] | None = None
        for i in other_pos:  # 1. read-only checks
            if not self.kernels[i].all_finite():
                bad = self._bad(i)
                break
        folded: list[int] = []
        if bad is None:  # 2. fused check and update
            for i in fused_pos:
                if not self.kernels[i].fold_checked(weight):
                    bad = self._bad(i)
                    break
                folded.append(i)
        ok = self._agree(bad is None)  # 3. every rank
        if not ok:
            for i in folded:
                self.kernels[i].undo(weight)
            self.check_first = True
            return FoldOutcome(step, False, bad)
        run = run_kernel or (lambda kernel, w: kernel(w))
        for i in other_pos:  # 4. the rest
            run(self.kernels[i], weight)
        self.check_first = False
        return FoldOutcome(step, True)

    def check(self, tensor_lists: Sequence[Sequence], step: int) -> FoldOutcome:
        """Whether a copy of the weights into the EMA (before `start_step`, `reset()`) may go ahead: every list in
        `tensor_lists` (one per kernel, in order) finite on every rank.

        Args:
            tensor_lists (`Sequence[Sequence[torch.Tensor]]`): The weights each kernel's group would copy.
            step (`int`): The optimizer step (reported in the outcome).
        """
        bad = None
        for i, (kernel, tensors) in enumerate(zip(self.kernels, tensor_lists)):
            finite = kernel.all_finite() if tensors is kernel.live else all_finite(tensors)
            if not finite:
                index = first_nonfinite(tensors)
                bad = (self.group_ids[i], index if index is not None else 0)
                break
        ok = self._agree(bad is None)
        return FoldOutcome(step, ok, None if ok else bad)

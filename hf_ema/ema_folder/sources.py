"""What a save writes, by source: the EMA's averaged and copied tensors, the model's own tensors that the EMA does
not hold (a frozen base, non-float buffers), and for a bias-corrected EMA (BEMA) the corrected weights and the
snapshot `theta_0`. Each rank holds its part of each."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model_ema import ModelEMA
    from ..sharding.base import FlatPiece

__all__ = ["THETA0_PREFIX", "Source", "SourceKind", "SaveSources"]

#: Key prefix of BEMA's `theta_0` tensors in `ema_state.safetensors` (and of their entries in a save plan).
THETA0_PREFIX = "bema_theta0."


class SourceKind(enum.Enum):
    """Where the values of a tensor in the folder come from."""

    #: An averaged EMA tensor (written in the model's dtype, and exactly in `ema_state.safetensors` when needed).
    AVERAGED = "averaged"
    #: A tensor the EMA copies from the model (an integer buffer).
    COPIED = "copied"
    #: One of the model's own tensors that the EMA does not hold, written as it is.
    MODEL = "model"
    #: BEMA's corrected weights of an averaged tensor (what the loadable weights of a bias-corrected EMA hold).
    CORRECTED = "bema"
    #: BEMA's snapshot `theta_0` of an averaged tensor (stored exactly, for resume).
    THETA0 = "bema_theta0"


@dataclass(frozen=True)
class Source:
    """One tensor a save reads.

    Args:
        kind (`SourceKind`): Where its values come from.
        name (`str`): Its name in the EMA (the model's `state_dict` name).
    """

    kind: SourceKind
    name: str

    @property
    def is_ema(self) -> bool:
        """Whether it is the EMA's own tensor (averaged or copied)."""
        return self.kind in (SourceKind.AVERAGED, SourceKind.COPIED)

    @property
    def key(self) -> str:
        """Its key in `ema_state.safetensors` and in the plan's locations."""
        return THETA0_PREFIX + self.name if self.kind is SourceKind.THETA0 else self.name


class SaveSources:
    """The tensors one save reads, by [`Source`]: this rank's part of each, where it lies in the full tensor, and
    the dtype it has in the loadable weights.

    Args:
        ema (`ModelEMA`): The EMA being saved.
    """

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema
        self.layout = ema.layout
        self._tensors = {t.name: t for t in ema.named_tensors()}
        self._model: dict[str, torch.Tensor] | None = None
        self._correction = ema.bias_correction
        self._index = {name: i for i, name in enumerate(ema.names)}

    def provided(self) -> set[str]:
        """The names the EMA provides (its tensors and their tied aliases)."""
        out = set(self._tensors)
        out.update(a for aliases in self.ema.selection.aliases.values() for a in aliases)
        return out

    def aliases(self, name: str) -> list[str]:
        """The other names of a tied EMA tensor (none for most).

        Args:
            name (`str`): The EMA tensor's name.
        """
        return self.ema.selection.aliases.get(name, [])

    def ema_sources(self) -> list[Source]:
        """The EMA's tensors: the averaged ones first, then the copied ones."""
        return [
            Source(SourceKind.AVERAGED if t.averaged else SourceKind.COPIED, t.name) for t in self._tensors.values()
        ]

    def weight_sources(self) -> list[Source]:
        """What the loadable weights hold for the EMA's tensors: the EMA, or BEMA's corrected weights of the
        averaged ones."""
        if self._correction is None:
            return self.ema_sources()
        return [
            Source(SourceKind.CORRECTED if t.averaged else SourceKind.COPIED, t.name) for t in self._tensors.values()
        ]

    def exact_sources(self) -> list[Source]:
        """What must be stored exactly for a resume: the EMA's tensors, and BEMA's `theta_0` once taken."""
        out = self.ema_sources()
        if self._correction is not None and self._correction.ready:
            out += [Source(SourceKind.THETA0, name) for name in self.ema.names]
        return out

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's own tensors that the EMA does not hold, by `state_dict` name (never gathered)."""
        if self._model is None:
            self._model = self.layout.model_tensors(self.ema.model, self.provided())
        return self._model

    def piece(self, source: Source) -> FlatPiece:
        """Where this rank's part of a source lies in the full tensor (nothing is computed).

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.layout.model_piece(source.name, self.model_tensors()[source.name])[1]
        return self.layout.ema_piece(source.name, self._tensors[source.name].ema)

    def local(self, source: Source) -> tuple[torch.Tensor, FlatPiece]:
        """This rank's part of a source, and where it lies in the full tensor (BEMA's corrected weights are formed
        here, one tensor at a time).

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.layout.model_piece(source.name, self.model_tensors()[source.name])
        return self._values(source), self.piece(source)

    def _values(self, source: Source) -> torch.Tensor:
        t = self._tensors[source.name]
        if source.kind in (SourceKind.AVERAGED, SourceKind.COPIED):
            return t.ema
        correction = self._correction
        assert correction is not None  # only a bias-corrected EMA has these sources
        index = self._index[source.name]
        if source.kind is SourceKind.THETA0:
            return correction.theta0[index]
        return correction.corrected(index, t.ema, t.live, correction.alpha(self.ema.step))

    def full(self, source: Source) -> torch.Tensor | None:
        """The full tensor of a source on the main process, `None` elsewhere (a collective).

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.layout.full_model_tensor(source.name, self.model_tensors()[source.name])
        return self.layout.full_tensor(source.name, self._values(source))

    def weight_dtype(self, source: Source) -> torch.dtype:
        """The dtype of a source in the loadable weights: that of the model tensor it stands for.

        Args:
            source (`Source`): The tensor.
        """
        if source.kind in (SourceKind.AVERAGED, SourceKind.CORRECTED):
            return self._tensors[source.name].live.dtype
        return self.ema_dtype(source)

    def ema_dtype(self, source: Source) -> torch.dtype:
        """The dtype the EMA keeps a source in (for the model's own tensors: their dtype).

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.model_tensors()[source.name].dtype
        if source.kind is SourceKind.THETA0:
            return self._tensors[source.name].live.dtype
        return self._tensors[source.name].ema.dtype

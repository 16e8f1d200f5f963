"""What a save writes, by source: the EMA's averaged and copied tensors, and the model's own tensors that the EMA does
not hold (a frozen base, non-float buffers). Each rank holds its part of each."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model_ema import ModelEMA
    from ..sharding.base import FlatPiece

__all__ = ["Source", "SourceKind", "SaveSources"]


class SourceKind(enum.Enum):
    """Where the values of a tensor in the folder come from."""

    #: An averaged EMA tensor (written in the model's dtype, and exactly in `ema_state.safetensors` when needed).
    AVERAGED = "averaged"
    #: A tensor the EMA copies from the model (an integer buffer).
    COPIED = "copied"
    #: One of the model's own tensors that the EMA does not hold, written as it is.
    MODEL = "model"


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
        """Whether the EMA holds it (averaged or copied)."""
        return self.kind is not SourceKind.MODEL


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

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's own tensors that the EMA does not hold, by `state_dict` name (never gathered)."""
        if self._model is None:
            self._model = self.layout.model_tensors(self.ema.model, self.provided())
        return self._model

    def local(self, source: Source) -> tuple[torch.Tensor, FlatPiece]:
        """This rank's part of a source, and where it lies in the full tensor.

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.layout.model_piece(source.name, self.model_tensors()[source.name])
        local = self._tensors[source.name].ema
        return local, self.layout.ema_piece(source.name, local)

    def full(self, source: Source) -> torch.Tensor | None:
        """The full tensor of a source on the main process, `None` elsewhere (a collective).

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.MODEL:
            return self.layout.full_model_tensor(source.name, self.model_tensors()[source.name])
        return self.layout.full_tensor(source.name, self._tensors[source.name].ema)

    def weight_dtype(self, source: Source) -> torch.dtype:
        """The dtype of a source in the loadable weights: that of the model tensor it stands for.

        Args:
            source (`Source`): The tensor.
        """
        if source.kind is SourceKind.AVERAGED:
            return self._tensors[source.name].live.dtype
        return self.local(source)[0].dtype

    def ema_dtype(self, source: Source) -> torch.dtype:
        """The dtype the EMA keeps a source in (for the model's own tensors: their dtype).

        Args:
            source (`Source`): The tensor.
        """
        return self.local(source)[0].dtype

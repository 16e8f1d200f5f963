"""What a pane asks for: a [`VariantSpec`] (raw, EMA, a BEMA run's plain EMA, a post-hoc EMA of any width, a merge of
the last checkpoints, another checkpoint's EMA), validated when built, with a short form (`posthoc:0.15`,
`merge:wsm:4`, `ema@checkpoint-8`, `ema-plain`) for the API and the tests."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from hf_ema import ConfigError, ConfigTypeError

__all__ = ["KINDS", "MAX_PANES", "MERGE_METHODS", "VariantSpec"]

#: Variant kinds, with the name the page shows for each.
KINDS = {
    "raw": "raw weights",
    "ema": "EMA",
    "ema_plain": "BEMA's plain EMA (uncorrected)",
    "posthoc": "post-hoc EMA (any sigma_rel)",
    "merge": "merge of the last k checkpoints",
    "checkpoint_ema": "another checkpoint's EMA",
}
MERGE_METHODS = ("mean", "wsm")
MAX_PANES = 4
_SPEC_RE = re.compile(
    r"^(?:posthoc:(?P<sigma>[^:]+)|merge:(?P<method>[a-z]+):(?P<k>[^:]+)|ema@(?P<ckpt>.+)|(?P<plain>ema-plain)"
    r"|(?P<kind>raw|ema))$"
)


def _as_number(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"`{name}` must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class VariantSpec:
    """What one pane shows; validated when built.

    Args:
        kind (`str`): One of [`KINDS`]: `"raw"`, `"ema"`, `"ema_plain"` (the EMA under a bias-corrected EMA's
            correction), `"posthoc"`, `"merge"` or `"checkpoint_ema"`.
        sigma_rel (`float`, *optional*): The post-hoc EMA's relative width (`kind="posthoc"`); its range is checked
            by `hf_ema.reconstruct`.
        k (`int`, *optional*): How many of the newest checkpoints to merge (`kind="merge"`), at least 2.
        method (`str`, *optional*): `"mean"` or `"wsm"` (`kind="merge"`; defaults to `"mean"`).
        checkpoint (`str`, *optional*): The checkpoint whose EMA to show (`kind="checkpoint_ema"`).
    """

    kind: str
    sigma_rel: float | None = None
    k: int | None = None
    method: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"`kind` must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "posthoc":
            if self.sigma_rel is None:
                raise ConfigError("`sigma_rel` must be given for a post-hoc EMA, got None")
            object.__setattr__(self, "sigma_rel", _as_number("sigma_rel", self.sigma_rel))
        if self.kind == "merge":
            k = _as_number("k", self.k) if self.k is not None else None
            if k is None or not k.is_integer() or k < 2:
                raise ConfigError(f"`k` (checkpoints to merge) must be a whole number >= 2, got {self.k!r}")
            object.__setattr__(self, "k", int(k))
            method = self.method or "mean"
            if method not in MERGE_METHODS:
                raise ConfigError(f"`method` must be one of {list(MERGE_METHODS)}, got {self.method!r}")
            object.__setattr__(self, "method", method)
        if self.kind == "checkpoint_ema" and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise ConfigError(f"`checkpoint` must name the checkpoint whose EMA to show, got {self.checkpoint!r}")

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """A spec from its short form: `raw`, `ema`, `ema-plain`, `posthoc:0.15`, `merge:mean:3`, `merge:wsm:4`,
        `ema@checkpoint-8`.

        Args:
            text (`str`): The short form.
        """
        if not isinstance(text, str):
            raise ConfigTypeError(f"`variant` must be a string such as 'posthoc:0.15', got {text!r}")
        match = _SPEC_RE.match(text.strip())
        if match is None:
            raise ConfigError(
                "`variant` must be raw, ema, ema-plain, posthoc:SIGMA_REL, merge:mean:K, merge:wsm:K or ema@CHECKPOINT, "
                f"got {text!r}"
            )
        if match["kind"]:
            return cls(match["kind"])
        if match["plain"]:
            return cls("ema_plain")
        if match["sigma"] is not None:
            return cls("posthoc", sigma_rel=_as_number("sigma_rel", match["sigma"]))
        if match["method"] is not None:
            return cls("merge", k=_as_number("k", match["k"]), method=match["method"])
        return cls("checkpoint_ema", checkpoint=match["ckpt"])

    def __str__(self) -> str:
        if self.kind == "posthoc":
            return f"posthoc:{self.sigma_rel:g}"
        if self.kind == "merge":
            return f"merge:{self.method}:{self.k}"
        if self.kind == "checkpoint_ema":
            return f"ema@{self.checkpoint}"
        if self.kind == "ema_plain":
            return "ema-plain"
        return self.kind

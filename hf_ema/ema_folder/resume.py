"""What a resume checks before it loads an `ema/` folder into an EMA: the folder's state, a config that changed in a
way that changes the average (refused unless allowed), and the values read (no NaN or inf, unless the config ignores
them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import SELECTION_FIELDS, FieldChange, config_changes
from ..errors import CheckpointError, ConfigError, ConfigMismatchError
from ..model_ema import ModelEMA
from ..utils.paths import STATE_NAME

__all__ = ["ResumePlan", "check_finite", "check_state", "plan_resume"]

logger = logging.getLogger(__name__)

#: What the error names as the way to go on with changed settings.
OPT_IN = (
    "`allow_config_change=True` (`EMACallback(allow_config_change=True)` or `load_ema(..., allow_config_change=True)`)"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_state(meta: dict[str, Any], folder: Path) -> int:
    """The folder's format version, once `ema_state.json` holds what a resume reads, else a one-line
    `CheckpointError` naming the file and the entry.

    Args:
        meta (`dict`): The folder's `ema_state.json`.
        folder (`Path`): The `ema/` folder.
    """
    path = folder / STATE_NAME
    version = meta.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise CheckpointError(f"`{path}` is corrupt: `format_version` is {version!r}, not a format number")
    for key in ("step", "num_updates"):
        if key not in meta:
            raise CheckpointError(f"`{path}` is corrupt: it has no `{key}`")
        if not _is_int(meta[key]) or meta[key] < 0:
            raise CheckpointError(f"`{path}` is corrupt: `{key}` is {meta[key]!r}, not a count")
    return version


@dataclass(frozen=True)
class ResumePlan:
    """How an EMA resumes from a folder saved with other settings (all empty when nothing changed).

    Args:
        changes (`list[FieldChange]`): The fields that change the average, old and new.
        new_tensors (`list[str]`): Tensors the EMA holds now but the folder does not: they start from the current
            weights.
        dropped_tensors (`list[str]`): Tensors of the folder the EMA no longer holds: they leave the EMA.
    """

    changes: list[FieldChange]
    new_tensors: list[str]
    dropped_tensors: list[str]

    def apply(self, ema: ModelEMA, meta: dict[str, Any], folder: Path) -> None:
        """After the load: start the new tensors from the current weights, and record the config history.

        Args:
            ema (`ModelEMA`): The EMA just loaded.
            meta (`dict`): The folder's `ema_state.json`.
            folder (`Path`): The folder.
        """
        if self.new_tensors:
            new = set(self.new_tensors)
            with torch.no_grad():
                for t in ema.named_tensors():
                    if t.name in new:
                        t.ema.copy_(t.live)
            logger.warning(
                "hf-ema: the EMA now also averages %d tensors that %s did not hold; they start from the current "
                "weights at step %d: %s",
                len(new),
                folder,
                meta["step"],
                ", ".join(self.new_tensors),
            )
        if self.dropped_tensors:
            logger.warning(
                "hf-ema: %d tensors of %s leave the EMA (no longer selected): %s",
                len(self.dropped_tensors),
                folder,
                ", ".join(self.dropped_tensors),
            )
        history = _saved_history(meta)
        now = ema.config.to_dict()
        if not history or history[-1]["config"] != now:
            history.append({"step": meta["step"], "config": now})
        ema.config_history = history


def _saved_history(meta: dict[str, Any]) -> list[dict[str, Any]]:
    saved = meta.get("config_history")
    if isinstance(saved, list) and all(isinstance(e, dict) and "config" in e for e in saved):
        return [dict(e) for e in saved]
    # An hf-ema that kept no history: the saved config, from the EMA's start.
    return [{"step": 0, "config": meta["config"]}] if isinstance(meta.get("config"), dict) else []


def _saved_names(meta: dict[str, Any]) -> set[str] | None:
    if isinstance(meta.get("tensors"), dict):  # format 2: every tensor the folder holds
        return set(meta["tensors"])
    if isinstance(meta.get("names"), list):
        return set(meta["names"]) | set(meta.get("copied_names") or [])
    return None


def plan_resume(ema: ModelEMA, folder: Path, meta: dict[str, Any], allow_config_change: bool) -> ResumePlan:
    """Compare the folder's config with the EMA's: a change of a field that changes the average (`MATH_FIELDS`) is
    refused in one line naming each field, old and new, and the opt-in, unless `allow_config_change`. A change of
    the tensor selection counts only when it selects other tensors.

    Args:
        ema (`ModelEMA`): The EMA to restore.
        folder (`Path`): The `ema/` folder.
        meta (`dict`): Its `ema_state.json`.
        allow_config_change (`bool`): Go on with the EMA's settings.

    Raises:
        `ConfigMismatchError`: the settings changed and `allow_config_change` is `False`.
    """
    if not isinstance(meta.get("config"), dict):
        return ResumePlan([], [], [])
    try:
        changes = config_changes(meta["config"], ema.config)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"`{folder / STATE_NAME}` is corrupt: its `config` is not valid: {err}") from None
    saved = _saved_names(meta)
    current = {t.name for t in ema.named_tensors()}
    if saved is not None and saved == current:
        changes = [c for c in changes if c.name not in SELECTION_FIELDS]  # the same tensors: the same average
    if not changes:
        return ResumePlan([], [], [])
    if not allow_config_change:
        fields = ", ".join(str(c) for c in changes)
        raise ConfigMismatchError(
            f"cannot resume the EMA from `{folder}`: it was saved with settings that change its average ({fields}); "
            f"resume with the saved settings, or pass {OPT_IN} to go on with the new ones from step {meta['step']}"
        )
    if saved is None:
        return ResumePlan(changes, [], [])
    return ResumePlan(changes, sorted(current - saved), sorted(saved - current))


def check_finite(ema: ModelEMA, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an EMA that holds NaN or inf (unless its config ignores non-finite values), naming the tensor and the
    folder: resuming it would carry them on for good.

    Args:
        ema (`ModelEMA`): The EMA being restored.
        folder (`Path`): The `ema/` folder.
        tensors (`dict[str, torch.Tensor]`): The values read.

    Raises:
        `CheckpointError`: a tensor holds NaN or inf.
    """
    if ema.config.on_nonfinite == "ignore":
        return
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"`{folder}` holds NaN or inf in the EMA tensor {name!r}: resuming would carry them on "
                f"(on_nonfinite={ema.config.on_nonfinite!r}); resume from an earlier checkpoint, or set "
                f"on_nonfinite='ignore' to load it as it is"
            )

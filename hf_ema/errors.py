"""The exceptions hf-ema raises.

Every error a user can cause derives from [`HfEmaError`], and also from the builtin exception a caller would
expect (`ValueError`, `TypeError`, `FileNotFoundError`), so `except ValueError` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "HfEmaError",
    "StateError",
]


class HfEmaError(Exception):
    """Base class of every error raised by hf-ema."""


class ConfigError(HfEmaError, ValueError):
    """An argument has a value outside its allowed range or conflicts with another argument."""


class ConfigTypeError(HfEmaError, TypeError):
    """An argument has the wrong type."""


class CheckpointError(HfEmaError, ValueError):
    """A checkpoint or EMA folder is missing, incomplete or does not match the model."""


class StateError(HfEmaError, RuntimeError):
    """An operation was called in a state where it would corrupt the EMA (e.g. `update()` inside `swapped()`)."""

"""The exceptions hf-ema raises.

Every error a user can cause derives from [`HfEmaError`], and also from the builtin exception a caller would
expect (`ValueError`, `TypeError`, `FileNotFoundError`), so `except ValueError` keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigError",
    "ConfigMismatchError",
    "ConfigTypeError",
    "HfEmaError",
    "NonFiniteWeightsError",
    "HubError",
    "MissingDependencyError",
    "StateError",
    "install_hint",
    "require_extra",
]


class HfEmaError(Exception):
    """Base class of every error raised by hf-ema."""


class ConfigError(HfEmaError, ValueError):
    """An argument has a value outside its allowed range or conflicts with another argument."""


class ConfigTypeError(HfEmaError, TypeError):
    """An argument has the wrong type."""


class CheckpointError(HfEmaError, ValueError):
    """A checkpoint or EMA folder is missing, incomplete or does not match the model."""


class CheckpointWriteError(HfEmaError, OSError):
    """Writing an EMA folder failed (a full disk, no permission): the message names the folder and says what is left
    as it was; `errno` is the system's error number."""


class ConfigMismatchError(HfEmaError, ValueError):
    """Two configurations that must agree do not: an EMA resumed with settings that change its average, or
    checkpoints of differently configured models merged. The message names each field, old and new, and the
    argument that allows it."""


class StateError(HfEmaError, RuntimeError):
    """An operation was called in a state where it would corrupt the EMA (e.g. `update()` inside `swapped()`)."""


class HubError(HfEmaError, RuntimeError):
    """The Hugging Face Hub could not be reached, did not answer in time, or refused a request."""


class NonFiniteWeightsError(HfEmaError, FloatingPointError):
    """The weights held NaN or inf at an EMA update made with `on_nonfinite="raise"` (the EMA was left as it was)."""


class MissingDependencyError(HfEmaError, ImportError):
    """An optional dependency is not installed; the message names the extra to install (see [`install_hint`])."""


def install_hint(extra: str) -> str:
    """How to install one of hf-ema's extras, for the messages of [`MissingDependencyError`] and the CLI. hf-ema is
    installed from a clone of its repository until it is published on the package index.

    Args:
        extra (`str`): The extra, e.g. `"demo"`.
    """
    return f"install hf-ema's `{extra}` extra (pip install '.[{extra}]' in a clone of hf-ema)"


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise [`MissingDependencyError`], naming the extra to install, unless `module` is installed. Only looked up
    (`importlib.util.find_spec`), not imported, so a check costs nothing and can come before any work starts.

    Args:
        module (`str`): The top-level module, e.g. `"peft"`.
        extra (`str`): hf-ema's extra that installs it, e.g. `"peft"`.
        what (`str`): What needs it, for the message, e.g. `"a LoRA run"`.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{what} needs {module}, which is not installed: {install_hint(extra)}")

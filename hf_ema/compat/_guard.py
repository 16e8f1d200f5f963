"""The version guard shared by the compatibility modules."""

from __future__ import annotations

import importlib.metadata
from functools import cache

from packaging.version import Version

from ..errors import HfEmaError

__all__ = ["UpstreamChangedError", "missing_api", "require_version", "version_of"]


class UpstreamChangedError(HfEmaError, RuntimeError):
    """An upstream library no longer provides a private API hf-ema relies on (or is older than supported)."""


@cache
def version_of(distribution: str) -> Version | None:
    """The installed version of `distribution`, or `None` when it is not installed.

    Args:
        distribution (`str`): The distribution name, e.g. `"transformers"`.
    """
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def require_version(distribution: str, minimum: str, feature: str) -> None:
    """Raise [`UpstreamChangedError`] unless `distribution` is installed at `minimum` or newer.

    Args:
        distribution (`str`): The distribution name.
        minimum (`str`): The oldest supported version.
        feature (`str`): What needs it, for the message.
    """
    have = version_of(distribution)
    if have is None or have.release < Version(minimum).release:
        raise UpstreamChangedError(
            f"{feature} needs {distribution}>={minimum}, found {have or 'none'}; "
            f"run `pip install -U '{distribution}>={minimum}'`"
        )


def missing_api(distribution: str, api: str, feature: str) -> UpstreamChangedError:
    """The error for a private API that the installed upstream no longer has.

    Args:
        distribution (`str`): The distribution name.
        api (`str`): The private name that is missing.
        feature (`str`): What needs it.
    """
    return UpstreamChangedError(
        f"{feature} relies on {distribution}'s private `{api}`, which {distribution} {version_of(distribution)} "
        f"does not have; please report this at the hf-ema issue tracker and pin an earlier {distribution}"
    )

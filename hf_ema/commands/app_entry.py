"""How the CLI finds the raw-vs-EMA app: through the `hf_ema.apps` entry point, so the library never imports it."""

from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points
from types import ModuleType

from ..errors import HfEmaError, install_hint

__all__ = ["AppUnavailableError", "load_app"]

APP_GROUP = "hf_ema.apps"


class AppUnavailableError(HfEmaError, RuntimeError):
    """The app (or Gradio, which it needs) is not installed."""


def load_app(name: str = "serve") -> ModuleType:
    """The app's launch module (`start_app`, `serve_until_interrupted`, `smoke_request`), found by entry point.

    Args:
        name (`str`, *optional*, defaults to `"serve"`): The entry point's name in the `hf_ema.apps` group.
    """
    found = [ep for ep in entry_points(group=APP_GROUP) if ep.name == name]
    if not found:
        raise AppUnavailableError(
            f"the hf-ema app is not installed (no `{name}` entry point in `{APP_GROUP}`); reinstall hf-ema"
        )
    if importlib.util.find_spec("gradio") is None:
        raise AppUnavailableError(f"the app needs Gradio: {install_hint('serve')}")
    return found[0].load()

"""Types shared by the CLI modules."""

from __future__ import annotations

from typing import Any

__all__ = ["SubParsers"]

#: What `ArgumentParser.add_subparsers()` returns (argparse keeps its class private).
SubParsers = Any

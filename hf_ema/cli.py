"""`hf-ema <command>`: the command-line interface. Each command is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

__all__ = ["build_parser", "main"]

# Each module in `hf_ema.commands` defines `register(subparsers)`, which adds one sub-command whose parser sets
# `func` to a callable taking the parsed arguments and returning an exit code.
COMMAND_MODULES = ["demo", "env", "merge", "plot", "posthoc", "push", "serve"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="hf-ema", description="EMA of model weights for the Hugging Face Trainer.")
    parser.add_argument("--version", action="version", version=f"hf-ema {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hf_ema.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-ema` console script.

    Args:
        argv (`list[str]`, *optional*): Arguments; defaults to `sys.argv[1:]`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from .errors import HfEmaError

    try:
        return int(args.func(args) or 0)
    except HfEmaError as err:
        # User errors get one clear line, not a traceback.
        print(f"hf-ema {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

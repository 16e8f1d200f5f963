"""`hf-ema <command>`: the command-line interface. Each command is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from ._version import __version__

__all__ = ["build_parser", "cli_message", "main"]

# Each module in `hf_ema.commands` defines `register(subparsers)`, which adds one sub-command whose parser sets
# `func` to a callable taking the parsed arguments and returning an exit code, and `flags`: the library argument
# names its errors may mention, mapped to the command's flags (`{"output_dir": "--out"}`).
COMMAND_MODULES = ["demo", "env", "merge", "plot", "posthoc", "push", "serve"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="hf-ema", description="EMA of model weights for the Hugging Face Trainer.")
    parser.add_argument("--version", action="version", version=f"hf-ema {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hf_ema.commands.{name}").register(subparsers)
    return parser


def cli_message(message: str, flags: dict[str, str]) -> str:
    """A library error message as the command line says it: on one line, with the library's argument names
    (`` `output_dir` ``, `overwrite=True`) replaced by the command's flags (`` `--out` ``, `--overwrite`).

    Args:
        message (`str`): The library's message.
        flags (`dict[str, str]`): Library argument name to flag.
    """
    for name, flag in flags.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}=True\b", flag, message)
        message = message.replace(f"`{name}`", f"`{flag}`")
    return re.sub(r"\s*\n\s*", " ", message).strip()


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
    except (HfEmaError, OSError) as err:
        # User errors (and the system refusing a read or write: permissions, a full disk) get one clear line, in
        # the command's own terms, not a traceback.
        print(f"hf-ema {args.command}: error: {cli_message(str(err), getattr(args, 'flags', {}))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The options every command that writes a folder shares: `--overwrite` and `--no-progress`."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_output_options", "output_options"]


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add `--overwrite` (replace the output folder only when hf-ema wrote it) and `--no-progress`.

    Args:
        parser (`argparse.ArgumentParser`): The command's parser.
    """
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it exists and hf-ema wrote it (never another folder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """The library arguments of those options: `overwrite` and `progress`.

    Args:
        args (`argparse.Namespace`): The parsed command line.
    """
    return {"overwrite": args.overwrite, "progress": not args.no_progress}

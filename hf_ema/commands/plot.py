"""`hf-ema plot RUN_DIR`: raw vs EMA eval loss (and the stability metrics) over steps, as a PNG."""

from __future__ import annotations

import argparse

from ..cli_types import SubParsers


def run(args: argparse.Namespace) -> int:
    from ..errors import require_extra
    from ..tools.plotting import plot_run

    require_extra("matplotlib", "plot", "`hf-ema plot`")
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot raw vs EMA eval loss (and stability metrics) of a run from its trainer_state.json"
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (output_dir), one of its checkpoint-N folders, or an ema/ in one",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the PNG to write, never inside an ema/ folder (default: ema_eval.png in the run or checkpoint folder)",
    )
    parser.set_defaults(func=run, flags={"out_path": "--out"})

"""`hf-ema posthoc RUN_DIR --sigma-rel 0.08 --out DIR`: reconstruct the EMA of any width from post-hoc snapshots."""

from __future__ import annotations

import argparse

from ..cli_types import SubParsers
from ..utils.jsonio import read_json
from .output_options import add_output_options, output_options


def run(args: argparse.Namespace) -> int:
    from ..posthoc import RECIPE_NAME, describe_snapshots, reconstruct

    out = reconstruct(
        args.run_dir,
        sigma_rel=args.sigma_rel,
        out_dir=args.out,
        step=args.step,
        **output_options(args),
    )
    recipe = read_json(out / RECIPE_NAME)
    used = describe_snapshots((entry["step"], entry["sigma_rel"]) for entry in recipe["snapshots"])
    print(
        f"post-hoc EMA sigma_rel={recipe['sigma_rel']:g} (gamma {recipe['gamma']:.2f}) at step {recipe['step']} "
        f"from {used}: {out}"
    )
    print(f"relative profile fit error: {recipe['relative_profile_error']:.2e}")
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "posthoc",
        help="reconstruct the EMA of any sigma_rel from a run's post-hoc snapshots (EDM2)",
        description="Least-squares reconstruction of a power-function EMA from EMACallback(posthoc=...) snapshots.",
    )
    parser.add_argument("run_dir", help="the run's output_dir (or its ema_posthoc/ folder)")
    parser.add_argument("--sigma-rel", type=float, required=True, help="wanted relative EMA width, e.g. 0.08")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder, never inside what it reads (default: ema-sigma_rel-S in the run folder)",
    )
    parser.add_argument("--step", type=int, default=None, help="training step of the wanted EMA (default: last)")
    add_output_options(parser)
    parser.set_defaults(
        func=run,
        flags={
            "out_dir": "--out",
            "overwrite": "--overwrite",
            "sigma_rel": "--sigma-rel",
            "step": "--step",
        },
    )

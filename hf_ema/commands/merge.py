"""`hf-ema merge CHECKPOINTS... --out DIR`: average saved checkpoints (mean, EMA-like or WSM decay emulation)."""

from __future__ import annotations

import argparse

from ..cli_types import SubParsers
from ..utils.jsonio import read_json
from .output_options import add_output_options, output_options


def run(args: argparse.Namespace) -> int:
    from ..tools.merge import MERGE_RECIPE_NAME, merge_checkpoints

    out = merge_checkpoints(
        args.checkpoints,
        args.out,
        method=args.method,
        schedule=args.schedule,
        weights=args.weights,
        ema_decay=args.ema_decay,
        use_ema=args.ema,
        sort_by_step=not args.keep_order,
        allow_config_mismatch=args.allow_config_mismatch,
        **output_options(args),
    )
    recipe = read_json(out / MERGE_RECIPE_NAME)
    print(f"merged {len(recipe['checkpoints'])} checkpoints ({recipe['method']}) into {out}")
    for entry in recipe["checkpoints"]:
        print(f"  {entry['weight']:.4f}  {entry['weights_from']}")
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="average saved checkpoints (mean, EMA-like, or WSM learning-rate-decay emulation)",
        description="Average saved checkpoints tensor by tensor into a from_pretrained-loadable folder.",
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders (ordered by step unless --keep-order)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--method", choices=["mean", "ema", "wsm"], default="mean", help="merge weights (default: mean)"
    )
    parser.add_argument(
        "--schedule",
        choices=["linear", "cosine", "1-sqrt"],
        default=None,
        help="decay shape emulated by --method wsm (default: 1-sqrt)",
    )
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="explicit weights, oldest first")
    parser.add_argument(
        "--ema-decay", type=float, default=0.5, help="per-checkpoint decay of --method ema (default: 0.5)"
    )
    parser.add_argument(
        "--ema", action="store_true", help="merge each checkpoint's ema/ folder instead of its raw weights"
    )
    parser.add_argument("--keep-order", action="store_true", help="merge in the given order instead of by step")
    parser.add_argument(
        "--allow-config-mismatch",
        action="store_true",
        help="merge checkpoints whose configs describe different models (same tensors); the newest one's config",
    )
    add_output_options(parser)
    parser.set_defaults(
        func=run,
        flags={
            "output_dir": "--out",
            "overwrite": "--overwrite",
            "method": "--method",
            "schedule": "--schedule",
            "weights": "--weights",
            "ema_decay": "--ema-decay",
            "use_ema": "--ema",
            "allow_config_mismatch": "--allow-config-mismatch",
        },
    )

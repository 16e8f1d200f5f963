"""`hf-ema demo`: train the tiny offline model with EMA (the README's first command)."""

from __future__ import annotations

import argparse
import time


def run(args: argparse.Namespace) -> int:
    from ..demo import train_tiny_run

    start = time.perf_counter()
    results = train_tiny_run(
        output_dir=args.output_dir, max_steps=args.max_steps, decay=args.decay, lora=args.lora, force=args.force
    )
    verb = "trained" if results["trained"] else "found (skipped training; pass --force to retrain)"
    print(f"run {verb} in {time.perf_counter() - start:.1f}s: {results['output_dir']}")
    print(f"EMA weights: {results['ema_dir']}  (from_pretrained-loadable)")
    print(f"eval loss   raw: {results['eval_loss']:.4f}   EMA: {results['eval_ema_loss']:.4f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train the tiny offline model with EMA and report raw vs EMA loss")
    parser.add_argument("--output-dir", default="runs/tiny", help="run folder (default: runs/tiny)")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay (default: 0.99)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of the full model")
    parser.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    parser.set_defaults(func=run)

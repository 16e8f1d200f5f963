"""`hf-ema demo`: train the tiny offline model with EMA, then open the raw-vs-EMA app (the README's first command)."""

from __future__ import annotations

import argparse
import os
import time

from ..cli_types import SubParsers
from .app_entry import load_app

#: Set to 1 to start the app, check it answers one request, and exit (headless runs, tests, CI).
EXIT_AFTER_START_ENV = "HF_EMA_DEMO_EXIT_AFTER_START"


def run(args: argparse.Namespace) -> int:
    from ..demo.tiny_run import train_tiny_run
    from ..demo.toy import require_demo_extra
    from ..errors import require_extra

    # The extras are checked before any training: a missing one is one line naming it, not a traceback later.
    require_demo_extra()
    if args.lora:
        require_extra("peft", "peft", "`--lora`")
    # The app (repository folder `serve/`, installed as `hf_ema.app`) is found by entry point, never imported here.
    app = None if args.no_serve else load_app()

    start = time.perf_counter()
    results = train_tiny_run(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        decay=args.decay,
        lora=args.lora,
        save_steps=args.save_steps,
        force=args.force,
    )
    verb = "trained" if results["trained"] else "found (skipped training; pass --force to retrain)"
    print(f"run {verb} in {time.perf_counter() - start:.1f}s: {results['output_dir']}")
    print(f"EMA weights: {results['ema_dir']}  (from_pretrained-loadable)")
    print(f"eval loss   raw: {results['eval_loss']:.4f}   EMA: {results['eval_ema_loss']:.4f}")
    if app is None:
        return 0

    exit_after_start = args.exit_after_start or os.environ.get(EXIT_AFTER_START_ENV, "0") not in ("", "0")
    demo, url = app.start_app(
        results["output_dir"], host=args.host, port=args.port, open_browser=args.open_browser and not exit_after_start
    )
    print(f"app running at {url}  (open it in a browser; Ctrl+C to stop)", flush=True)
    if exit_after_start:
        try:
            raw, ema = app.smoke_request(url)
        finally:
            demo.close()
        print(f"smoke test: raw and EMA both generated ({len(raw)} and {len(ema)} characters)")
        print(f"  raw: {raw!r}\n  EMA: {ema!r}")
        return 0
    app.serve_until_interrupted(demo)
    return 0


def register(subparsers: SubParsers) -> None:
    from ..demo.tiny_run import DEFAULT_DECAY, DEFAULT_MAX_STEPS

    parser = subparsers.add_parser(
        "demo", help="train the tiny offline model with EMA, then compare raw and EMA generations in a Gradio app"
    )
    parser.add_argument("--output-dir", default="runs/tiny", help="run folder (default: runs/tiny)")
    parser.add_argument(
        "--max-steps", type=int, default=DEFAULT_MAX_STEPS, help=f"optimizer steps (default: {DEFAULT_MAX_STEPS})"
    )
    parser.add_argument("--decay", type=float, default=DEFAULT_DECAY, help=f"EMA decay (default: {DEFAULT_DECAY})")
    parser.add_argument(
        "--save-steps", type=int, default=None, help="checkpoint/eval interval (default: a sixth of --max-steps)"
    )
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of the full model")
    parser.add_argument(
        "--force", action="store_true", help="retrain even if a finished run exists (replaces only a run hf-ema wrote)"
    )
    parser.add_argument("--no-serve", action="store_true", help="only train (and report raw vs EMA loss)")
    parser.add_argument("--host", default="127.0.0.1", help="address the app binds (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="app port (default: 7860, or the next free one)")
    parser.add_argument("--open-browser", action="store_true", help="open the app in the default browser")
    parser.add_argument(
        "--exit-after-start",
        action="store_true",
        help=f"start the app, send it one request, print the answer and exit (same as {EXIT_AFTER_START_ENV}=1)",
    )
    parser.set_defaults(
        func=run,
        flags={
            "output_dir": "--output-dir",
            "force": "--force",
            "max_steps": "--max-steps",
            "save_steps": "--save-steps",
            "decay": "--decay",
            "port": "--port",
            "host": "--host",
        },
    )

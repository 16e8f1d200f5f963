"""`hf-ema serve PATH`: compare the raw and the EMA model's generations side by side in a Gradio app."""

from __future__ import annotations

import argparse

from ..cli_types import SubParsers
from .app_entry import load_app

#: `start_app` arguments for the app's variant cache, passed on only when given.
CACHE_OPTIONS = ("cache_dir", "max_cached_variants", "max_cache_size")


def run(args: argparse.Namespace) -> int:
    # The app (repository folder `serve/`, installed as `hf_ema.app`) is found by entry point, never imported here.
    app = load_app()

    demo, url = app.start_app(
        args.path,
        host=args.host,
        port=args.port,
        share=args.share,
        trust_remote_code=args.trust_remote_code,
        base_model=args.base_model,
        device=args.device,
        open_browser=args.open_browser,
        # The variant cache: only what was given, so the app's own defaults apply otherwise.
        **{name: getattr(args, name) for name in CACHE_OPTIONS if getattr(args, name) is not None},
    )
    print(f"hf-ema serve: raw vs EMA for {args.path} at {url}  (Ctrl+C to stop)", flush=True)
    app.serve_until_interrupted(demo)
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="compare raw and EMA generations of a checkpoint side by side in a Gradio app"
    )
    parser.add_argument(
        "path", help="checkpoint folder (checkpoint-N/), training output folder, or Hub repo id with an ema/ subfolder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also create a public Gradio share link")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code shipped with the checkpoint"
    )
    parser.add_argument("--base-model", default=None, help="base model of a PEFT checkpoint (default: the adapter's)")
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    # The app's variant cache (post-hoc reconstructions and merges built on demand); its defaults live in the app.
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="keep built variants in this folder (default: a temporary one, removed at exit)",
    )
    parser.add_argument(
        "--max-cached-variants", type=int, default=None, help="built variants kept on disk (default: the app's, 8)"
    )
    parser.add_argument(
        "--max-cache-size", default=None, help="most the variant cache holds, e.g. 5GB (default: the app's, 20GB)"
    )
    parser.set_defaults(
        func=run,
        flags={
            "base_model": "--base-model",
            "port": "--port",
            "host": "--host",
            "device": "--device",
            "cache_dir": "--cache-dir",
            "max_cached_variants": "--max-cached-variants",
            "max_cache_size": "--max-cache-size",
        },
    )

"""`hf-ema push PATH --repo-id ID`: upload an EMA to the Hugging Face Hub with a model card."""

from __future__ import annotations

import argparse

from ..cli_types import SubParsers


def run(args: argparse.Namespace) -> int:
    from ..tools.hub import push_ema

    url = push_ema(
        args.path,
        args.repo_id,
        subfolder=None if args.as_main else args.subfolder,
        as_main=args.as_main,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
        timeout=args.timeout,
    )
    where = "as the main weights" if args.as_main else f"to {args.subfolder}/"
    print(f"pushed {args.path} {where} of {args.repo_id}: {url}")
    return 0


def register(subparsers: SubParsers) -> None:
    from ..compat.huggingface_hub import DEFAULT_TIMEOUT

    parser = subparsers.add_parser(
        "push",
        help="upload an ema/ folder to the Hugging Face Hub with a model card",
        description="Upload an EMA (an ema/ folder, or a checkpoint / run folder holding one) to a Hub repository, "
        "creating it if needed, with a model card giving the EMA's decay, step and raw vs EMA eval metrics.",
    )
    parser.add_argument("path", help="an ema/ folder, or a checkpoint or run folder holding ema/")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, e.g. user/my-model")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--subfolder", default="ema", help="repository folder to upload into (default: ema)")
    where.add_argument("--as-main", action="store_true", help="make the EMA the repository's main weights")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the saved login)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds any one Hub request may go without an answer (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.set_defaults(
        func=run,
        flags={
            "repo_id": "--repo-id",
            "subfolder": "--subfolder",
            "as_main": "--as-main",
            "revision": "--revision",
            "commit_message": "--commit-message",
            "token": "--token",
            "timeout": "--timeout",
        },
    )

"""`hf-ema env`: print versions, for bug reports."""

from __future__ import annotations

import argparse
import platform

from .._version import __version__
from ..cli_types import SubParsers


def run(args: argparse.Namespace) -> int:
    import accelerate
    import peft
    import torch
    import transformers

    from ..engine.native import compiler

    rows = {
        "hf-ema": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        # Which kernel a bf16/fp16 model's fp32 EMA gets on CPU (see hf_ema.engine.kernels).
        "C compiler (native CPU kernel)": compiler() or "none: mixed-precision CPU updates use the fallback kernels",
    }
    for key, value in rows.items():
        print(f"- {key}: {value}")
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("env", help="print the versions of hf-ema and its dependencies")
    parser.set_defaults(func=run)

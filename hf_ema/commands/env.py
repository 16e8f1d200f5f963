"""`hf-ema env`: print versions, for bug reports.

Every version is read from the installed package's metadata (`importlib.metadata`), never by importing it: the
command answers in a fraction of a second and works even when a package is broken.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from .._version import __version__
from ..cli_types import SubParsers

#: The packages a bug report needs: the required ones, then the optional ones behind the extras and engines.
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "numpy",
    "datasets",
    "gradio",
    "matplotlib",
    "diffusers",
    "deepspeed",
    "triton",
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_runtime() -> str:
    # A CUDA build of torch from pip brings the runtime as a package (`nvidia-cuda-runtime-cu12`, ...); a CPU build
    # says so in its version (`2.13.0+cpu`).
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("nvidia-cuda-runtime"):
            return f"{name} {dist.version}"
    return "none installed by pip"


def rows() -> dict[str, str]:
    """What `hf-ema env` prints, by label."""
    from ..utils.toolchain import c_compiler

    out = {
        "hf-ema": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "OS": f"{platform.platform()} ({platform.machine()})",
    }
    out.update({name: _version(name) for name in PACKAGES})
    out["CUDA runtime"] = _cuda_runtime()
    # Which kernel a bf16/fp16 model's fp32 EMA gets on CPU (see hf_ema.engine.kernels).
    out["C compiler (native CPU kernel)"] = (
        c_compiler() or "none: mixed-precision CPU updates use the fallback kernels"
    )
    return out


def run(args: argparse.Namespace) -> int:
    for key, value in rows().items():
        print(f"- {key}: {value}")
    return 0


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("env", help="print the versions of hf-ema, its dependencies and the platform")
    parser.set_defaults(func=run)

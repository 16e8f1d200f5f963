"""The update engine: how EMA tensors are folded in (fused kernels, the native CPU kernel, CPU offload, the CUDA side
stream). [`ModelEMA`] drives it through [`EMAUpdater`]."""

from .kernels import BACKENDS, LerpKernel, copy_, lerp_
from .native import compiler
from .updater import EMAUpdater

__all__ = ["BACKENDS", "EMAUpdater", "LerpKernel", "compiler", "copy_", "lerp_"]

"""The EMA implementations the benchmarks compare against, behind one interface: `build(model) -> Impl`.

Each anchor is configured the way its documentation shows, at its fastest documented setting (foreach where it has
one); its EMA dtype is whatever it keeps by default for that model, and is reported beside its time.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DECAY = 0.999


@dataclass
class Impl:
    """One EMA under test: `update()` does one EMA update from the model's current weights."""

    name: str
    update: Callable[[], None]
    ema_dtype: torch.dtype
    holder: object = None  # keeps the EMA object alive while it is timed
    note: str = ""


def _first_float_dtype(tensors) -> torch.dtype:
    return next(t.dtype for t in tensors if t.is_floating_point())


def hf_ema(model: nn.Module, **kwargs) -> Impl:
    from hf_ema import ModelEMA

    ema = ModelEMA(model, decay=DECAY, **kwargs)
    backends = sorted({k.backend for k in ema._updater.kernels})
    if ema._updater.device_update is not None:
        backends.append("triton")
    suffix = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    name = "hf-ema ModelEMA" + (f" ({suffix})" if suffix else "")
    return Impl(name, ema.update, ema.shadow[0].dtype, ema, note="kernel: " + "+".join(backends))


def classic_loop(model: nn.Module, ema_dtype: torch.dtype | None = None) -> Impl:
    """The per-parameter `mul_`/`add_` loop of countless training scripts (EMA = deepcopy of the model)."""
    params = [p for p in model.parameters()]
    ema = [p.detach().to(ema_dtype or p.dtype, copy=True) for p in params]

    @torch.no_grad()
    def update():
        for e, p in zip(ema, params):
            e.mul_(DECAY).add_(p.detach(), alpha=1 - DECAY)

    name = "classic mul_/add_ loop" + (f" ({str(ema_dtype).removeprefix('torch.')} EMA)" if ema_dtype else "")
    return Impl(name, update, ema[0].dtype, ema)


def torch_averaged_model(model: nn.Module) -> Impl:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    avg.update_parameters(model)  # the first call copies; the timed calls average
    return Impl(
        "torch AveragedModel (foreach)",
        lambda: avg.update_parameters(model),
        _first_float_dtype(avg.parameters()),
        avg,
    )


def diffusers_ema(model: nn.Module, foreach: bool) -> Impl:
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=DECAY, foreach=foreach)
    params = list(model.parameters())
    return Impl(
        f"diffusers EMAModel (foreach={foreach})",
        lambda: ema.step(params),
        _first_float_dtype(ema.shadow_params),
        ema,
    )


def ema_pytorch(model: nn.Module, use_foreach: bool) -> Impl:
    from ema_pytorch import EMA

    ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1, use_foreach=use_foreach)
    ema.update()  # the first call initialises (copies)
    return Impl(
        f"ema-pytorch EMA (use_foreach={use_foreach})", ema.update, _first_float_dtype(ema.ema_model.parameters()), ema
    )


def load_timm_model_ema_v3():
    """timm's `ModelEmaV3` class, or None.

    timm's package `__init__` imports torchvision, which would pull a CUDA torch here, so timm is installed with
    `pip install --no-deps timm` and its self-contained `timm/utils/model_ema.py` is loaded by file path (unchanged
    timm code, without importing the rest of timm).
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "model_ema.py")
    if not os.path.isfile(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, "ModelEmaV3", None)


def timm_ema(model: nn.Module, dtype: torch.dtype | None = None) -> Impl | None:
    """timm `ModelEmaV3` (foreach; a bf16 EMA uses its stochastic rounding, on by default)."""
    cls = load_timm_model_ema_v3()
    if cls is None:
        return None
    if dtype is None:
        ema = cls(model, decay=DECAY)
    else:
        try:
            ema = cls(model, decay=DECAY, dtype=dtype)
        except TypeError:  # timm releases whose ModelEmaV3 has no `dtype` (e.g. 1.0.x)
            return None
    name = "timm ModelEmaV3 (foreach" + (f", dtype={str(dtype).removeprefix('torch.')})" if dtype else ")")
    return Impl(name, lambda: ema.update(model), _first_float_dtype(ema.module.parameters()), ema)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


#: name -> builder. Builders return None when the library is missing.
ANCHORS: dict[str, Callable[[nn.Module], Impl | None]] = {
    "classic": classic_loop,
    "averaged_model": torch_averaged_model,
    "diffusers_foreach": lambda m: diffusers_ema(m, True),
    "diffusers_loop": lambda m: diffusers_ema(m, False),
    "ema_pytorch_foreach": lambda m: ema_pytorch(m, True),
    "ema_pytorch_loop": lambda m: ema_pytorch(m, False),
    "timm_v3": timm_ema,
}
#: Extra anchors that keep an fp32 EMA of low-precision weights (the obvious ways to get what hf-ema does).
FP32_EMA_ANCHORS: dict[str, Callable[[nn.Module], Impl | None]] = {
    "classic_fp32": lambda m: classic_loop(m, torch.float32),
    "timm_v3_fp32": lambda m: timm_ema(m, torch.float32),
}


def safe_build(builder, model):
    """Build an anchor; a missing optional library gives None (reported as "not installed")."""
    try:
        return builder(model)
    except ImportError:
        return None


#: Llama shapes for the benchmark sizes (vocab 32000, tied embeddings).
LLAMA_SIZES = {
    "50M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10, num_attention_heads=8),
    "200M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16),
    "500M": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=23, num_attention_heads=20),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
}


def build_llama(size: str, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A Llama of about `size` parameters from a config, weights drawn from N(0, 0.02) (no init pass, no download).

    Args:
        size (`str`): A key of `LLAMA_SIZES`.
        dtype (`torch.dtype`): Parameter dtype.
        device (`str`, *optional*, defaults to `"cpu"`): Where the weights live.
        seed (`int`, *optional*, defaults to 0): Seed of the weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=512, **LLAMA_SIZES[size])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # `to_empty` gives tied parameters separate storage again
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model

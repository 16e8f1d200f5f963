"""Which of a model's tensors the EMA averages, which it copies, and under which names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .compat.torch import unwrap_compiled
from .config import EMAConfig
from .errors import ConfigError

__all__ = ["Selection", "is_peft_model", "select_tensors", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip `DistributedDataParallel` / `DataParallel` / `torch.compile` wrappers.

    FSDP and DeepSpeed engines are left alone: their parameters are the sharded ones we want.

    Args:
        model (`nn.Module`): The possibly wrapped model.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif (inner := unwrap_compiled(model)) is not None:  # torch.compile
            model = inner
        elif type(model).__name__ == "DeepSpeedEngine":
            model = getattr(model, "module")  # noqa: B009 - an attribute of DeepSpeed's engine, not a submodule
        else:
            return model


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (checked without importing peft when it is not loaded)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional (the `peft` extra): without it no model is a PeftModel
        return False
    return isinstance(model, PeftModel)


@dataclass
class Selection:
    """The tensors an EMA tracks.

    Args:
        averaged (`list[tuple[str, torch.Tensor]]`): Name and live tensor of each averaged tensor.
        copied (`list[tuple[str, torch.Tensor]]`): Name and live tensor of each non-float buffer, copied as is.
        aliases (`dict[str, list[str]]`): For each selected name, every other `state_dict` key that shares its
            storage (tied embeddings), so a saved state dict replaces all of them.
    """

    averaged: list[tuple[str, torch.Tensor]]
    copied: list[tuple[str, torch.Tensor]]
    aliases: dict[str, list[str]] = field(default_factory=dict)


def _matches(patterns: list[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def select_tensors(model: nn.Module, config: EMAConfig) -> Selection:
    """Pick the tensors to average and to copy, following `config`.

    Defaults: every floating parameter (each shared parameter once) and every floating persistent buffer; for a
    PEFT model, only the trainable (adapter) parameters.

    Args:
        model (`nn.Module`): The unwrapped model.
        config (`EMAConfig`): The EMA configuration.

    Raises:
        `ConfigError`: an `include`/`exclude` pattern matches no tensor, or nothing is left to average.
    """
    trainable_only = config.trainable_only if config.trainable_only is not None else is_peft_model(model)

    # Every state_dict key of a parameter, including the aliases of tied weights (remove_duplicate=False).
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)

    candidates: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        if trainable_only and not param.requires_grad:
            continue
        candidates.append((name, param))

    copied: list[tuple[str, torch.Tensor]] = []
    if not trainable_only:
        # Non-persistent buffers (rotary inv_freq, position ids) are rebuilt from the config: skip them.
        persistent = set(model.state_dict(keep_vars=True).keys())
        for name, buf in model.named_buffers():
            if name not in persistent:
                continue
            if buf.dtype.is_floating_point:
                if config.include_buffers:
                    candidates.append((name, buf))
            else:
                copied.append((name, buf))

    names = [name for name, _ in candidates]
    for option in ("include", "exclude"):
        patterns = getattr(config, option) or []
        for pattern in patterns:
            if not any(re.search(pattern, n) for n in names):
                raise ConfigError(
                    f"`{option}` pattern {pattern!r} matches no tensor of the model "
                    f"({len(names)} candidates, e.g. {names[:3]!r})"
                )
    averaged = [
        (name, t)
        for name, t in candidates
        if (config.include is None or _matches(config.include, name))
        and not (config.exclude and _matches(config.exclude, name))
    ]
    if not averaged:
        raise ConfigError(
            f"no tensor left to average with trainable_only={trainable_only!r}, include={config.include!r}, "
            f"exclude={config.exclude!r}"
        )
    alias_map = {name: [a for a in aliases.get(id(t), []) if a != name] for name, t in averaged}
    return Selection(averaged=averaged, copied=copied, aliases={k: v for k, v in alias_map.items() if v})

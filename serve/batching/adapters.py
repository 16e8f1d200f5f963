"""LoRA adapters of one `PeftModel` as one stacked model: the base weights read once per token for all variants.

[`stack_adapters`] builds a structural copy of the base model that shares all its weights; its LoRA layers run the
base layer once for the whole batch and add each adapter's low-rank update to its own rows by two batched matmuls.
Adapters it does not cover run through peft ([`make_adapter_batch`] picks the way): its mixed-adapter batches
(`adapter_names=`), or one pass per adapter where peft cannot mix them (DoRA).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .runners import AdapterVariants, SequentialAdapters, StackedVariants, VariantBatch, peft_mixes, probe_matches

__all__ = ["make_adapter_batch", "stack_adapters"]


class _StackedLoRALinear(nn.Module):
    """A peft LoRA layer for `n` adapters at once, on a variant-major batch.

    Its base layer runs once on the whole batch (the shared base weights are read once per step), then each
    adapter's low-rank update is added to its own variant block by two batched matmuls. That is peft's vanilla LoRA
    forward, `base_layer(x) + lora_B(lora_A(x)) * scaling` (LoRA, Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x),
    computed in the same order and dtypes, without peft's per-adapter loop: peft's mixed-adapter batches
    (`adapter_names=`) index out each adapter's rows and register forward hooks on every layer for each call.
    Adapters of different ranks are zero-padded to the largest (the padding adds exact zeros); an adapter that does
    not target this layer gets a zero update, as peft skips it.
    """

    def __init__(
        self, base_layer: nn.Module, a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None], scaling
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.n = len(a)
        known = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        rank = max(x.shape[0] for x, _ in known)
        in_features, out_features = known[0][0].shape[1], known[0][1].shape[0]
        dtype, device = known[0][0].dtype, known[0][0].device
        lora_a = torch.zeros(self.n, rank, in_features, dtype=dtype, device=device)
        lora_b = torch.zeros(self.n, out_features, rank, dtype=dtype, device=device)
        for v, (x, y) in enumerate(zip(a, b)):
            if x is not None and y is not None:
                lora_a[v, : x.shape[0]] = x
                lora_b[v, :, : y.shape[1]] = y
        # Stored transposed, (n, in, r) and (n, r, out): each block multiplies as `x @ A.T`, then `@ B.T`, as
        # `nn.Linear` does.
        self.lora_a = nn.Parameter(lora_a.transpose(1, 2), requires_grad=False)
        self.lora_b = nn.Parameter(lora_b.transpose(1, 2), requires_grad=False)
        self.scaling = nn.Parameter(
            torch.tensor(scaling, dtype=dtype, device=device).view(-1, 1, 1), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        shape = x.shape
        blocks = x.reshape(self.n, -1, shape[-1])  # variant-major rows -> (n, rows * positions, in)
        if blocks.dtype != self.lora_a.dtype:
            blocks = blocks.to(self.lora_a.dtype)  # peft runs the update in the adapter's dtype ...
        update = torch.bmm(torch.bmm(blocks, self.lora_a), self.lora_b) * self.scaling
        out = result + update.reshape(*shape[:-1], update.shape[-1])
        return out if out.dtype == result.dtype else out.to(result.dtype)  # ... and returns the base layer's


def _stack_lora_layer(layer: nn.Module, adapter_names: Sequence[str]) -> nn.Module | None:
    """`layer` (a peft LoRA `Linear`) as a [`_StackedLoRALinear`] for `adapter_names` (its base layer alone when none
    of them targets it), or `None` where it holds anything but vanilla LoRA for them (DoRA and the other LoRA
    variants, biases on the LoRA weights, a merged adapter, active dropout)."""
    try:
        lora_a, lora_b, scaling = layer.lora_A, layer.lora_B, layer.scaling
        dropouts, variants = layer.lora_dropout, getattr(layer, "lora_variant", {})
        base_layer = layer.get_base_layer()
    except AttributeError:
        return None
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    a: list[torch.Tensor | None] = []
    b: list[torch.Tensor | None] = []
    factors: list[float] = []
    for name in adapter_names:
        if name not in lora_a:
            a.append(None)
            b.append(None)
            factors.append(0.0)
            continue
        down, up, dropout = lora_a[name], lora_b[name], dropouts[name]
        if name in variants or type(down) is not nn.Linear or type(up) is not nn.Linear:
            return None
        if down.bias is not None or up.bias is not None or (dropout.training and not isinstance(dropout, nn.Identity)):
            return None
        if not isinstance(scaling.get(name), (int, float)):
            return None
        a.append(down.weight.detach())
        b.append(up.weight.detach())
        factors.append(float(scaling[name]))
    weights = [w for w in a + b if w is not None]
    if not weights:
        return base_layer
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    return _StackedLoRALinear(base_layer, a, b, factors)


def stack_adapters(model: nn.Module, adapter_names: Sequence[str]) -> nn.Module | None:
    """One model running the LoRA adapters `adapter_names` of a `PeftModel` side by side on a variant-major batch,
    or `None` where it holds layers this does not cover (the caller then runs the adapters through peft).

    The result shares every weight of `model` and holds only the adapters' low-rank weights stacked (see
    [`_StackedLoRALinear`]); it changes nothing in `model` (no active adapter, no hooks), so requests can run it at
    the same time. It is checked against peft's own mixed-adapter forward on a short input before it is returned.
    Call it while nothing else changes `model` (its lock held: adapters being loaded, peft's hooks during a
    mixed-adapter forward).

    Args:
        model (`peft.PeftModel`): The model holding every adapter, in eval mode.
        adapter_names (`Sequence[str]`): One adapter per variant (repeats allowed).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if not hasattr(model, "get_base_model") or not adapter_names:
        return None
    base = model.get_base_model()
    replaced: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        if not type(module).__module__.startswith("peft."):
            continue
        stacked = _stack_lora_layer(module, adapter_names) if type(module) is LoraLinear else None
        if stacked is None:  # another peft layer (embedding LoRA, modules_to_save, DoRA...): peft's batches run it
            return None
        replaced[name] = stacked
    if not replaced:
        return None
    # A structural copy of the base model that shares its tensors and takes the stacked layers in place of peft's.
    memo: dict[int, Any] = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    memo.update({id(base.get_submodule(name)): new for name, new in replaced.items()})
    skeleton = copy.deepcopy(base, memo)
    skeleton.eval()
    names = list(adapter_names)
    rows = len(names)
    if not probe_matches(
        skeleton,
        model,
        rows,
        lambda probe: model(input_ids=probe.expand(rows, -1), adapter_names=names, use_cache=False).logits,
    ):
        return None
    return skeleton


def make_adapter_batch(model: nn.Module, adapter_names: Sequence[str], lock: Any = None) -> VariantBatch:
    """The fastest [`VariantBatch`] for adapters of one `PeftModel`: the stacked LoRA model of [`stack_adapters`],
    else peft's mixed-adapter batch ([`AdapterVariants`]), else one pass per adapter ([`SequentialAdapters`]).

    Args:
        model (`peft.PeftModel`): The model holding every adapter.
        adapter_names (`Sequence[str]`): One adapter per variant.
        lock (`threading.Lock`, *optional*): Held while the stacked model is built and during peft's mixed-adapter
            forward passes.
    """
    with lock or nullcontext():
        stacked = stack_adapters(model, adapter_names)
    if stacked is not None:
        return StackedVariants(stacked, len(adapter_names))
    if not peft_mixes(model, adapter_names):
        return SequentialAdapters(model, adapter_names, lock=lock)
    return AdapterVariants(model, adapter_names, lock=lock)

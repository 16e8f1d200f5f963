"""The ways to run `n` weight variants of one model on a variant-major batch, and the probe every stacked model is
checked with before use.

Rows are variant-major: with `b` rows per variant, rows `v * b ... v * b + b - 1` belong to variant `v`.
[`VariantBatch`] is what decoding and scoring use (`serve.batching.decoding`); the stacked models themselves are
built in `serve.batching.full_models` and `serve.batching.adapters`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

__all__ = [
    "AdapterVariants",
    "SequentialAdapters",
    "SequentialVariants",
    "SingleVariant",
    "StackedVariants",
    "VariantBatch",
    "new_cache",
    "peft_mixes",
    "probe_matches",
]


def _forward_parameters(model: nn.Module) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _cache_argument(model: nn.Module) -> str:
    # transformers 5 renamed the forward argument `past_key_values` to `cache`; the old name still works but warns
    # (a FutureWarning and a logged deprecation) on every call. Older releases only know `past_key_values`.
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def new_cache(model: nn.Module) -> Any:
    """An empty `DynamicCache` for `model` (built from its config when this transformers accepts one).

    Args:
        model (`nn.Module`): The model (or `PeftModel`) the cache is for.
    """
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)  # sliding-window layers and the like come from the config
    return DynamicCache()


class VariantBatch:
    """`n` weight variants of one model, run together on a variant-major batch.

    Subclasses implement [`VariantBatch.forward`]; [`decode`] and [`score_continuations`] use only that.

    Args:
        n (`int`): Number of variants.
        model (`nn.Module`): A model with the variants' architecture (for the config, the device, the cache).
    """

    def __init__(self, n: int, model: nn.Module) -> None:
        self.n = n
        self.model = model
        params = _forward_parameters(model)
        self._cache_arg = _cache_argument(model)
        self._logits_to_keep = "logits_to_keep" in params

    @property
    def device(self) -> torch.device:
        """Where the inputs go."""
        return next(self.model.parameters()).device

    def new_cache(self) -> Any:
        """An empty KV cache for one decoding run of the whole batch."""
        return new_cache(self.model)

    def _kwargs(self, cache: Any, last_only: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": cache is not None}
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # what `generate` asks for: the lm_head on the last position only
        return kwargs

    def forward(self, input_ids: torch.Tensor, cache: Any = None, *, last_only: bool = False) -> torch.Tensor:
        """Logits for a variant-major batch.

        Args:
            input_ids (`torch.Tensor`): Shape `(n * b, length)`, rows of variant `v` at `v * b ... v * b + b - 1`.
            cache (*optional*): A cache from [`VariantBatch.new_cache`], grown in place; `None` runs without one.
            last_only (`bool`, *optional*, defaults to `False`): Only the last position's logits are needed.

        Returns:
            `torch.Tensor`: logits `(n * b, positions, vocab)`.
        """
        raise NotImplementedError


class SingleVariant(VariantBatch):
    """One model on its own (no batching needed).

    Args:
        model (`nn.Module`): The model.
        lock (`threading.Lock`, *optional*): Held during each forward pass.
    """

    def __init__(self, model: nn.Module, lock: Any = None) -> None:
        super().__init__(1, model)
        self.lock = lock

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only=False):
        with self.lock or nullcontext():
            return self.model(input_ids=input_ids, **self._kwargs(cache, last_only)).logits


class AdapterVariants(VariantBatch):
    """PEFT adapters loaded on one `PeftModel`, run as one mixed-adapter batch (peft's `adapter_names=`).

    Args:
        model (`peft.PeftModel`): The model holding every adapter.
        adapter_names (`Sequence[str]`): One adapter per variant.
        lock (`threading.Lock`, *optional*): Held during each forward pass: peft implements mixed batches with
            forward hooks registered on the shared model for the duration of the call.
    """

    def __init__(self, model: nn.Module, adapter_names: Sequence[str], lock: Any = None) -> None:
        super().__init__(len(adapter_names), model)
        self.adapter_names = list(adapter_names)
        self.lock = lock

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only=False):
        rows = input_ids.shape[0] // self.n
        names = [name for name in self.adapter_names for _ in range(rows)]
        with self.lock or nullcontext():
            return self.model(input_ids=input_ids, adapter_names=names, **self._kwargs(cache, last_only)).logits


class SequentialAdapters(VariantBatch):
    """Fallback for adapters peft cannot mix in one batch (DoRA and other LoRA variants): one forward pass per
    adapter, each with its own cache and made the active adapter for that pass.

    Args:
        model (`peft.PeftModel`): The model holding every adapter.
        adapter_names (`Sequence[str]`): One adapter per variant.
        lock (`threading.Lock`, *optional*): Held during each pass: the active adapter is the shared model's state.
    """

    def __init__(self, model: nn.Module, adapter_names: Sequence[str], lock: Any = None) -> None:
        super().__init__(len(adapter_names), model)
        self.adapter_names = list(adapter_names)
        self.lock = lock

    def new_cache(self):
        return [new_cache(self.model) for _ in self.adapter_names]

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only=False):
        outs = []
        for v, (name, rows) in enumerate(zip(self.adapter_names, input_ids.chunk(self.n, dim=0))):
            kwargs = self._kwargs(None if cache is None else cache[v], last_only)
            with self.lock or nullcontext():
                if getattr(self.model, "active_adapter", None) != name:  # switching walks every layer: only if needed
                    self.model.set_adapter(name)
                logits = self.model(input_ids=rows, **kwargs).logits
            outs.append(logits[:, -1:] if last_only else logits)
        return torch.cat(outs, dim=0)


class SequentialVariants(VariantBatch):
    """Fallback for models that cannot share a batch: one forward pass per variant, each with its own cache.

    Args:
        models (`Sequence[nn.Module]`): One model per variant.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__(len(models), models[0])
        self.models = list(models)
        self._cache_args = [_cache_argument(m) for m in self.models]
        self._keep = ["logits_to_keep" in _forward_parameters(m) for m in self.models]

    def new_cache(self):
        return [new_cache(m) for m in self.models]

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only=False):
        outs = []
        for v, (model, rows) in enumerate(zip(self.models, input_ids.chunk(self.n, dim=0))):
            kwargs: dict[str, Any] = {self._cache_args[v]: None if cache is None else cache[v]}
            kwargs["use_cache"] = cache is not None
            if last_only and self._keep[v]:
                kwargs["logits_to_keep"] = 1
            logits = model(input_ids=rows, **kwargs).logits
            outs.append(logits[:, -1:] if last_only else logits)
        return torch.cat(outs, dim=0)


class StackedVariants(VariantBatch):
    """Full models with the same architecture, run as one stacked model (see [`stack_models`]).

    Args:
        stacked (`nn.Module`): The output of [`stack_models`].
        n (`int`): Number of variants in it.
    """

    def __init__(self, stacked: nn.Module, n: int) -> None:
        super().__init__(n, stacked)

    @torch.inference_mode()
    def forward(self, input_ids, cache=None, *, last_only=False):
        return self.model(input_ids=input_ids, **self._kwargs(cache, last_only)).logits


def peft_mixes(model: nn.Module, adapter_names: Sequence[str]) -> bool:
    """Whether peft takes these adapters in one mixed-adapter batch: it refuses DoRA adapters and merged layers.

    Checked here rather than by trying: a refused call raises inside peft's forward, after peft has registered its
    forward hooks on the model, and leaves them there (they would break every later call)."""
    for module in model.modules():
        if not type(module).__module__.startswith("peft."):
            continue
        use_dora = getattr(module, "use_dora", None)
        if getattr(module, "merged", False) is True:
            return False
        if isinstance(use_dora, dict) and any(use_dora.get(name, False) for name in adapter_names):
            return False
    return True


@torch.inference_mode()
def probe_matches(
    stacked: nn.Module, model: nn.Module, n: int, reference: Callable[[torch.Tensor], torch.Tensor]
) -> bool:
    """Whether `stacked` gives, on a short probe repeated for its `n` variants, the logits `reference(probe)` gives
    (the same variant-major rows, computed the reference way); `False` when either raises (an architecture the
    stacking does not fit: the caller runs the variants another way).

    Args:
        stacked (`nn.Module`): The stacked model.
        model (`nn.Module`): A variant's model (for the vocabulary size and the device).
        n (`int`): Number of variants.
        reference (`Callable`): Maps the probe `(1, length)` to the reference logits `(n, length, vocab)`.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    device = next(model.parameters()).device
    probe = torch.arange(5, device=device).remainder(vocab).unsqueeze(0)
    try:
        together = stacked(input_ids=probe.expand(n, -1), use_cache=False).logits
        alone = reference(probe)
    except Exception:
        return False
    return together.shape == alone.shape and torch.allclose(together.float(), alone.float(), rtol=1e-4, atol=1e-4)

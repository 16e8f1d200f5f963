"""Running several weight variants of one model together: one batched forward pass per token for all of them.

A request compares up to four variants (raw, EMA, post-hoc EMA, merges...). Decoding them one after the other costs
one forward pass per variant and token; here the variants share each pass instead:

- LoRA adapters on one base model ([`stack_adapters`]): a structural copy of the base model sharing all its weights,
  whose LoRA layers run the base weights once for the whole batch and add each adapter's low-rank update to its own
  rows by two batched matmuls. Adapters it does not cover run through peft: its mixed-adapter batches
  ([`AdapterVariants`], `adapter_names=`), or one pass per adapter where peft cannot mix them
  ([`SequentialAdapters`], DoRA).
- Full models with the same architecture ([`StackedVariants`]): one model whose `nn.Linear` layers hold the variants'
  weights stacked, `(n, out, in)`, and apply them with one batched matmul (`torch.baddbmm`) to the variant-major
  batch; norms and embeddings run stacked as well where a probe shows they match each variant's own module (else
  that module on its rows). Everything else
  (attention, rotary embeddings, the KV cache, masks) runs once for the whole batch. This beats `torch.func`'s
  `stack_module_state` + `functional_call` under `vmap` here: `vmap` has no batching rule for CPU SDPA attention
  (it falls back to a per-variant loop) and cannot grow a `DynamicCache` in place; see
  `benchmarks/serve_latency.py` for the measured figures.
- Anything else ([`SequentialVariants`]): one forward per variant, each with its own cache (still correct).

Rows are variant-major: with `b` rows per variant, rows `v * b ... v * b + b - 1` belong to variant `v`. Each
variant's rows see the computation the variant alone would do (the batched kernels may round differently in the last
bits), so greedy decoding gives what `model.generate(do_sample=False)` gives and seeded sampling what
`generate(do_sample=True)` gives after `torch.manual_seed(seed)`; the tests check both against models run alone.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_ema import ConfigError

__all__ = [
    "AdapterVariants",
    "DecodeState",
    "SequentialAdapters",
    "SequentialVariants",
    "StackedVariants",
    "VariantBatch",
    "decode",
    "make_adapter_batch",
    "make_variant_batch",
    "score_continuations",
    "stack_adapters",
    "stack_models",
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


# ---------------------------------------------------------------------------------------------- stacked full models
class _StackedLinear(nn.Module):
    """`n` `nn.Linear` layers applied to the `n` variant blocks of a variant-major batch by one batched matmul."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.n = len(layers)
        self.in_features = layers[0].in_features
        self.out_features = layers[0].out_features
        # (n, out, in), each variant's weight as `nn.Linear` holds it.
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]), requires_grad=False)
        if layers[0].bias is None:
            self.bias = None
        else:
            bias = torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1)
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        blocks = x.reshape(self.n, -1, shape[-1])  # variant-major rows -> (n, rows * positions, in)
        if blocks.shape[1] == 1:
            # One row per variant (a decoding step): `weight @ x` reads each weight row by row, contiguously; with
            # 2-4 variants this is 1.2-1.5x faster per decoding step than `x @ weight.T` (benchmarks/serve_latency.py).
            col = blocks.transpose(1, 2)
            if self.bias is None:
                out = torch.bmm(self.weight, col)
            else:
                out = torch.baddbmm(self.bias.transpose(1, 2), self.weight, col)
            out = out.transpose(1, 2)
        elif self.bias is None:
            out = torch.bmm(blocks, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias, blocks, self.weight.transpose(1, 2))
        return out.reshape(*shape[:-1], self.out_features)


#: Sibling linear layers that read the same input in the usual decoder blocks (attention's q/k/v, the gated MLP's
#: gate/up): a stacked model runs each group as one batched matmul.
_FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedLinears:
    """Stacked linear layers that read the same input, run as one batched matmul on their concatenated weights.

    The model calls each layer on its own ([`_FusedMember`]); the first call computes every layer's output for
    that input and keeps the others until they are asked for. A call with another input (an architecture that
    feeds them different tensors) just computes again, so the result is always each layer's own.
    """

    def __init__(self, layers: Sequence[_StackedLinear]) -> None:
        self.linear = _StackedLinear.__new__(_StackedLinear)
        nn.Module.__init__(self.linear)
        self.linear.n = layers[0].n
        self.linear.in_features = layers[0].in_features
        self.linear.out_features = sum(layer.out_features for layer in layers)
        self.linear.weight = nn.Parameter(torch.cat([layer.weight for layer in layers], dim=1), requires_grad=False)
        self.linear.bias = None
        if layers[0].bias is not None:
            self.linear.bias = nn.Parameter(torch.cat([layer.bias for layer in layers], dim=2), requires_grad=False)
        self.sizes = [layer.out_features for layer in layers]
        self.local = threading.local()  # requests run in threads; each has its own pending outputs

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = getattr(self.local, "pending", None)
        if pending is None or pending[0] is not x or index not in pending[1]:
            parts = self.linear(x).split(self.sizes, dim=-1)
            pending = (x, dict(enumerate(parts)))
        out = pending[1].pop(index)
        self.local.pending = pending if pending[1] else None  # nothing kept once every layer has its output
        return out


class _FusedMember(nn.Module):
    """One layer of a [`_FusedLinears`] group, where the model calls it."""

    def __init__(self, group: _FusedLinears, index: int, layer: _StackedLinear) -> None:
        super().__init__()
        self.group = group
        self.index = index
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        if index == 0:
            self.fused = group.linear  # registered once, so `parameters()` and `.to()` see the fused weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)


def _fuse_siblings(model: nn.Module) -> None:
    for parent in model.modules():
        for names in _FUSE_GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if not all(type(layer) is _StackedLinear for layer in layers):
                continue
            if len({layer.in_features for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1:
                continue
            group = _FusedLinears(layers)
            for index, (name, layer) in enumerate(zip(names, layers)):
                setattr(parent, name, _FusedMember(group, index, layer))


class _LinearPerVariant(nn.Module):
    """`n` `nn.Linear` layers, each applied to its own variant block (no stacked copy of the weights)."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.chunk(len(self.layers))
        return torch.cat([F.linear(rows, layer.weight, layer.bias) for layer, rows in zip(self.layers, blocks)], 0)


class _StackedElementwise(nn.Module):
    """A layer whose weights act along the last dimension of its input (RMSNorm and the like): one call on the whole
    batch, with the variants' (1-D) weights stacked as `(n, 1, features)` against the input viewed as variant blocks
    `(n, rows * positions, features)`.

    With one row per variant (every decoding step) the input already is that view, so it runs as it is, without the
    module-call machinery (nine of these layers per token in a 4-layer decoder; this saves about a third of their
    time).

    Used only where a probe shows it gives what each variant's own module gives (see [`stack_models`])."""

    def __init__(self, modules: Sequence[nn.Module], ndim: int) -> None:
        super().__init__()
        self.n = len(modules)
        self.ndim = ndim
        self.fallback = _PerVariant(modules)
        # A copy that shares the first variant's weights until they are replaced by the stacked ones below.
        self.module = copy.deepcopy(modules[0], {id(p): p for p in modules[0].parameters(recurse=False)})
        for name, _ in list(modules[0].named_parameters(recurse=False)):
            stacked = torch.stack([getattr(m, name).detach() for m in modules])  # (n, features)
            delattr(self.module, name)
            setattr(self.module, name, stacked.unsqueeze(1))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() != self.ndim or args or kwargs:
            return self.fallback(x, *args, **kwargs)
        if x.dim() == 3 and x.shape[0] == self.n:
            return self.module.forward(x)
        out = self.module.forward(x.reshape(self.n, -1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class _StackedEmbedding(nn.Module):
    """`n` embeddings as one lookup in their concatenated tables (row `i` of variant `v` at `v * vocab + i`)."""

    def __init__(self, modules: Sequence[nn.Embedding]) -> None:
        super().__init__()
        self.n = len(modules)
        self.vocab = modules[0].num_embeddings
        self.table = nn.Parameter(torch.cat([m.weight.detach() for m in modules]), requires_grad=False)
        # Per input shape: each row's offset into the table (a decoding step asks for the same ones every time).
        self._offsets: dict[tuple[Any, ...], torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        key = (input_ids.shape[0], input_ids.dim(), input_ids.device)
        offsets = self._offsets.get(key)
        if offsets is None:
            rows = input_ids.shape[0] // self.n
            offsets = torch.arange(self.n, device=input_ids.device).repeat_interleave(rows) * self.vocab
            offsets = self._offsets[key] = offsets.view(-1, *([1] * (input_ids.dim() - 1)))
        return F.embedding(input_ids + offsets, self.table)


def _elementwise_stack(modules: Sequence[nn.Module]) -> nn.Module:
    """`_StackedElementwise` when a probe shows it matches each variant's own module, else `_PerVariant`."""
    params = list(modules[0].parameters(recurse=False))
    if not params or not all(p.dim() == 1 and p.shape == params[0].shape for p in params):
        return _PerVariant(modules)
    features = params[0].shape[0]
    try:
        stacked = _StackedElementwise(modules, ndim=3)
        with torch.inference_mode():
            # Both paths: several rows per variant, and one (decoding steps).
            probes = [
                torch.randn(len(modules) * rows, 3, features, dtype=params[0].dtype, device=params[0].device)
                for rows in (2, 1)
            ]
            pairs = [(stacked(probe), stacked.fallback(probe)) for probe in probes]
    except Exception:  # a layer whose weights do not broadcast this way
        return _PerVariant(modules)
    if all(together.shape == alone.shape and torch.equal(together, alone) for together, alone in pairs):
        return stacked
    return _PerVariant(modules)


class _PerVariant(nn.Module):
    """Any other layer with weights: each variant's own module on its rows (norms, embeddings...)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.variants = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = len(self.variants)
        return torch.cat([module(rows, *args, **kwargs) for module, rows in zip(self.variants, x.chunk(n))], 0)


def _config_key(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    out = config.to_dict()
    out.pop("_name_or_path", None)  # where each variant was loaded from; not part of the architecture
    out.pop("transformers_version", None)
    return out


def _same_architecture(models: Sequence[nn.Module]) -> bool:
    first = models[0]
    if any(type(m) is not type(first) for m in models) or any(_config_key(m) != _config_key(first) for m in models):
        return False
    shapes = [[(k, v.shape, v.dtype, v.device) for k, v in m.state_dict().items()] for m in models]
    if any(s != shapes[0] for s in shapes):
        return False
    # Non-trainable state (rotary frequencies...) is taken from the first model: it must be the same in all.
    buffers = [dict(m.named_buffers()) for m in models]
    return all(torch.equal(b[k], buffers[0][k]) for b in buffers[1:] for k in buffers[0])


def stack_models(models: Sequence[nn.Module], linear: str = "bmm") -> nn.Module | None:
    """One model running the `models` (same architecture) side by side on a variant-major batch, or `None`.

    With `linear="bmm"` its `nn.Linear` weights are stacked copies applied by one batched matmul (so it holds one
    more copy of the variants' linear weights); with `linear="per-variant"` each variant's own `nn.Linear` runs on
    its block (no copy, `n` matmuls). Its other weighted layers are the variants' own modules. The result is checked
    against the variants run one by one on a short input; `None` when the architectures differ or the check fails
    (the caller then runs them one by one).

    Args:
        models (`Sequence[nn.Module]`): Two or more models in eval mode, same class, config and tensor shapes.
        linear (`str`, *optional*, defaults to `"bmm"`): `"bmm"` or `"per-variant"` (see above).
    """
    if linear not in ("bmm", "per-variant"):
        raise ConfigError(f"`linear` must be 'bmm' or 'per-variant', got {linear!r}")
    if len(models) < 2 or not _same_architecture(models):
        return None
    first = models[0]
    # A structural copy of the first model that shares its tensors (no weight copy) ...
    memo = {id(t): t for t in list(first.parameters()) + list(first.buffers())}
    skeleton = copy.deepcopy(first, memo)
    # ... whose weighted layers are then replaced, outermost first.
    per_model = [dict(m.named_modules()) for m in models]
    replaced: list[str] = []
    for name, module in first.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        group = [modules[name] for modules in per_model]
        if isinstance(module, nn.Linear):
            new: nn.Module = _StackedLinear(group) if linear == "bmm" else _LinearPerVariant(group)
        elif type(module) is nn.Embedding and module.max_norm is None:
            new = _StackedEmbedding(group)
        elif any(True for _ in module.parameters(recurse=False)):
            if next(module.children(), None) is None and linear == "bmm":
                new = _elementwise_stack(group)
            else:
                new = _PerVariant(group)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, attr, new)
        replaced.append(name)
    if linear == "bmm":
        _fuse_siblings(skeleton)
    skeleton.eval()
    if not _matches(
        skeleton,
        first,
        len(models),
        lambda probe: torch.cat([m(input_ids=probe, use_cache=False).logits for m in models]),
    ):
        return None
    return skeleton


@torch.inference_mode()
def _matches(stacked: nn.Module, model: nn.Module, n: int, reference: Callable[[torch.Tensor], torch.Tensor]) -> bool:
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


# ------------------------------------------------------------------------------------------- stacked LoRA adapters
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
    if not _matches(
        skeleton,
        model,
        rows,
        lambda probe: model(input_ids=probe.expand(rows, -1), adapter_names=names, use_cache=False).logits,
    ):
        return None
    return skeleton


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
    if not _peft_mixes(model, adapter_names):
        return SequentialAdapters(model, adapter_names, lock=lock)
    return AdapterVariants(model, adapter_names, lock=lock)


def _peft_mixes(model: nn.Module, adapter_names: Sequence[str]) -> bool:
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


def make_variant_batch(models: Sequence[nn.Module], lock: Any = None, linear: str = "bmm") -> VariantBatch:
    """The fastest [`VariantBatch`] for full models: the model itself, a stacked model, or one by one.

    Args:
        models (`Sequence[nn.Module]`): One model per variant.
        lock (`threading.Lock`, *optional*): Held during forward passes of a single model.
        linear (`str`, *optional*, defaults to `"bmm"`): How a stacked model applies its linear layers (see
            [`stack_models`]).
    """
    if len(models) == 1:
        return SingleVariant(models[0], lock)
    stacked = stack_models(models, linear=linear)
    if stacked is not None:
        return StackedVariants(stacked, len(models))
    return SequentialVariants(models)


#: Scoring passes keep their logits under about this many floats (a pass holds every variant's rows).
_SCORE_LOGITS_BUDGET = 64 * 2**20


# ---------------------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodeState:
    """The tokens generated so far by each variant.

    Args:
        tokens (`list[list[int]]`): Per variant, the new token ids (an end-of-sequence token included).
        finished (`list[bool]`): Per variant, whether it has stopped (end-of-sequence or `max_new_tokens`).
        own_nll (`list[list[float]]`, *optional*): With `decode(..., score_own=True)`: per variant, each new token's
            negative log-likelihood under the variant's own model (temperature 1); `None` otherwise.
    """

    tokens: list[list[int]]
    finished: list[bool] = field(default_factory=list)
    own_nll: list[list[float]] | None = None


def decode(
    batch: VariantBatch,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    score_own: bool = False,
) -> Iterator[DecodeState]:
    """Decode every variant of `batch` from the same prompt in lockstep: one batched forward pass per token.

    Each variant samples with its own `torch.Generator` seeded with `seed` and the warpers `generate` uses, in the
    same order, so each variant's tokens are what `generate` gives for it alone: `do_sample=False` when `greedy`,
    else `do_sample=True, temperature=..., top_p=..., top_k=0` after `torch.manual_seed(seed)`.

    Args:
        batch (`VariantBatch`): The variants.
        input_ids (`torch.Tensor`): The prompt, shape `(1, length)`.
        max_new_tokens (`int`): Tokens to generate per variant.
        greedy (`bool`): Take the most likely token.
        temperature (`float`, *optional*, defaults to 1.0): Softmax temperature when sampling.
        top_p (`float`, *optional*, defaults to 1.0): Nucleus mass when sampling.
        seed (`int`, *optional*, defaults to 0): Seed of every variant's sampler.
        eos_token_ids (`set[int]`, *optional*): Tokens that end a variant's text.
        score_own (`bool`, *optional*, defaults to `False`): Also keep each token's negative log-likelihood under its
            own variant's model (`DecodeState.own_nll`), taken from the decoding logits: the diagonal of the score
            matrix, which [`score_continuations`] can then skip.

    Yields:
        `DecodeState`: after every token (the same object, updated).
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    n = batch.n
    warpers = LogitsProcessorList()
    if not greedy:
        # The same warpers, in the same order, as `generate(do_sample=True, temperature=..., top_p=...)`.
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(n)]
    input_ids = input_ids.to(batch.device)
    history = [input_ids for _ in range(n)]
    state = DecodeState(tokens=[[] for _ in range(n)], finished=[False] * n)
    if score_own:
        state.own_nll = [[] for _ in range(n)]
    cache = batch.new_cache()
    step_input = input_ids.expand(n, -1)
    for step in range(max_new_tokens):
        logits = batch.forward(step_input, cache, last_only=True)[:, -1, :].float()
        if greedy:
            chosen = logits.argmax(dim=-1).tolist()
        else:
            chosen = []
            for v in range(n):
                if state.finished[v]:
                    chosen.append(0)
                    continue
                scores = warpers(history[v], logits[v : v + 1])
                probs = torch.softmax(scores, dim=-1).cpu()
                chosen.append(int(torch.multinomial(probs, num_samples=1, generator=generators[v])))
        if score_own:
            # The float32 cross-entropy `score_continuations` takes, here from the decoding step's logits.
            target = torch.tensor([0 if state.finished[v] else int(chosen[v]) for v in range(n)], device=logits.device)
            own = F.cross_entropy(logits, target, reduction="none").double().cpu().tolist()
            for v in range(n):
                if not state.finished[v]:
                    state.own_nll[v].append(own[v])
        feed = []
        for v in range(n):
            if state.finished[v]:
                feed.append(state.tokens[v][-1])  # keeps the batch rectangular; its output is ignored
                continue
            token = int(chosen[v])
            state.tokens[v].append(token)
            feed.append(token)
            if token in eos_token_ids:
                state.finished[v] = True
            elif not greedy:
                history[v] = torch.cat([history[v], history[v].new_tensor([[token]])], dim=-1)
        if step == max_new_tokens - 1:
            state.finished = [True] * n
        yield state
        if all(state.finished):
            return
        step_input = torch.tensor(feed, device=batch.device).unsqueeze(1)


@torch.inference_mode()
def score_continuations(
    batch: VariantBatch,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    skip: Collection[tuple[int, int]] = frozenset(),
) -> tuple[torch.Tensor, list[list[list[float]]]]:
    """Negative log-likelihood of each continuation of the prompt under each variant.

    The score of continuation `c` under variant `v` is what `model_v(input_ids=prompt + c, labels=[-100] * len(prompt)
    + c).loss` gives: the mean over `c`'s tokens of `-log p(token | prompt, earlier tokens)`. Continuations of the
    same length share batched forward passes (all variants, no padding), as many as fit in about
    `_SCORE_LOGITS_BUDGET` logits per pass.

    Args:
        batch (`VariantBatch`): The variants.
        prompt_ids (`Sequence[int]`): The prompt's token ids (at least one).
        continuations (`Sequence[Sequence[int]]`): Token ids to score, each non-empty.
        skip (`Collection[tuple[int, int]]`, *optional*): `(variant, continuation)` pairs not to score (already known,
            such as each variant's own text from [`decode`]`(..., score_own=True)`): their entry is NaN and their
            token list empty.

    Returns:
        `tuple`: the mean NLL matrix `(variants, continuations)` (float64) and, per variant and continuation, each
        token's NLL.
    """
    if not prompt_ids:
        raise ConfigError("`prompt_ids` must hold at least one token, got none")
    n = batch.n
    nll = torch.full((n, len(continuations)), math.nan, dtype=torch.float64)
    per_token: list[list[list[float]]] = [[[] for _ in continuations] for _ in range(n)]
    by_length: dict[int, list[int]] = {}
    for j, cont in enumerate(continuations):
        if not cont:
            raise ConfigError(f"`continuations[{j}]` must hold at least one token, got none")
        by_length.setdefault(len(cont), []).append(j)
    vocab = getattr(getattr(batch.model, "config", None), "vocab_size", None) or 32_000
    # Position t predicts token t + 1: the continuation's tokens are predicted from len(prompt) - 1 on.
    start = len(prompt_ids) - 1
    for length, members in by_length.items():
        total = len(prompt_ids) + length
        wanted = [[j for j in members if (v, j) not in skip] for v in range(n)]
        per_pass = max(1, _SCORE_LOGITS_BUDGET // (n * total * vocab))
        for first in range(0, max(len(w) for w in wanted), per_pass):
            chunks = [w[first : first + per_pass] for w in wanted]
            k = max(len(c) for c in chunks)
            # Variant-major, k rows per variant; a variant with fewer rows to score repeats one (output ignored).
            rows = [list(prompt_ids) + list(continuations[j]) for c in chunks for j in c + [members[0]] * (k - len(c))]
            ids = torch.tensor(rows, device=batch.device)
            logits = batch.forward(ids, None).float()
            pred = logits[:, start : total - 1, :]
            target = ids[:, len(prompt_ids) :]
            token_nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
            token_nll = token_nll.reshape(ids.shape[0], length).double().cpu()
            for v, chunk in enumerate(chunks):
                for a, j in enumerate(chunk):
                    row = token_nll[v * k + a]
                    nll[v, j] = row.mean()
                    per_token[v][j] = row.tolist()
    return nll, per_token

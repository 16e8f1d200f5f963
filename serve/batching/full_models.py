"""Full models with the same architecture as one stacked model: one batched forward pass per token for all variants.

The stacked model ([`stack_models`]) is a structural copy of the first variant whose `nn.Linear` layers hold the
variants' weights stacked, `(n, out, in)`, and apply them with one batched matmul (`torch.baddbmm`) to the
variant-major batch; linear layers that read the same input (attention's q/k/v, the gated MLP's gate/up) run as one
matmul over their concatenated weights; norms and embeddings run stacked as well where a probe shows they match each
variant's own module (else that module on its rows). Everything else (attention, rotary embeddings, the KV cache,
masks) runs once for the whole batch. This beats `torch.func`'s `stack_module_state` + `functional_call` under
`vmap` here: `vmap` has no batching rule for CPU SDPA attention (it falls back to a per-variant loop) and cannot grow
a `DynamicCache` in place; see `benchmarks/serve_latency.py` for the measured figures.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_ema import ConfigError

from .runners import SequentialVariants, SingleVariant, StackedVariants, VariantBatch, probe_matches

__all__ = ["make_variant_batch", "stack_models"]


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
    if not probe_matches(
        skeleton,
        first,
        len(models),
        lambda probe: torch.cat([m(input_ids=probe, use_cache=False).logits for m in models]),
    ):
        return None
    return skeleton


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

"""Running several weight variants of one model together: one batched forward pass per token for all of them.

A request compares up to four variants (raw, EMA, post-hoc EMA, merges...). Decoding them one after the other costs
one forward pass per variant and token; here the variants share each pass instead:

- LoRA adapters on one base model (`serve.batching.adapters`, [`stack_adapters`]): a structural copy of the base
  model sharing all its weights, whose LoRA layers run the base weights once for the whole batch and add each
  adapter's low-rank update to its own rows by two batched matmuls. Adapters it does not cover run through peft: its
  mixed-adapter batches ([`AdapterVariants`], `adapter_names=`), or one pass per adapter where peft cannot mix them
  ([`SequentialAdapters`], DoRA).
- Full models with the same architecture (`serve.batching.full_models`, [`stack_models`]): one model whose linear
  layers hold the variants' weights stacked and apply them with one batched matmul; norms and embeddings stacked
  where a probe shows they match; attention, rotary embeddings and the KV cache run once for the whole batch.
- Anything else ([`SequentialVariants`]): one forward per variant, each with its own cache (still correct).

`serve.batching.runners` holds the ways of running a batch ([`VariantBatch`] and its subclasses) and the probe every
stacked model is checked with; `serve.batching.decoding` decodes and scores through any of them ([`decode`],
[`score_continuations`]).
"""

from .adapters import make_adapter_batch, stack_adapters
from .decoding import DecodeState, decode, score_continuations
from .full_models import make_variant_batch, stack_models
from .runners import (
    AdapterVariants,
    SequentialAdapters,
    SequentialVariants,
    SingleVariant,
    StackedVariants,
    VariantBatch,
    new_cache,
)

__all__ = [
    "AdapterVariants",
    "DecodeState",
    "SequentialAdapters",
    "SequentialVariants",
    "SingleVariant",
    "StackedVariants",
    "VariantBatch",
    "decode",
    "make_adapter_batch",
    "make_variant_batch",
    "new_cache",
    "score_continuations",
    "stack_adapters",
    "stack_models",
]

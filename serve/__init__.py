"""The Gradio app of hf-ema: raw, EMA, post-hoc EMA and merged weights of a run, decoded together and scored.

`serve.loading`, `serve.specs`, `serve.variants`, `serve.batching`, `serve.compare`, `serve.generation`,
`serve.tokens`, `serve.render` and `serve.cache` work without Gradio; `serve.app.build_demo` builds the page (its
parts in `serve.page`, its events and API endpoints in `serve.handlers`) and `serve.launch.start_app` starts it (what
`hf-ema serve PATH` and `python -m serve PATH` run).
"""

from __future__ import annotations

from typing import Any

from .compare import Comparison, PaneResult, compare, generate_pair, stream_comparison, stream_pair
from .generation import MAX_NEW_TOKENS_LIMIT, GenerationSettings, validate_prompt
from .loading import CheckpointCatalog, CheckpointRef, ModelPair, find_checkpoints, load_pair
from .specs import VariantSpec
from .variants import Variant, VariantStore

__all__ = [
    "MAX_NEW_TOKENS_LIMIT",
    "CheckpointCatalog",
    "CheckpointRef",
    "Comparison",
    "GenerationSettings",
    "ModelPair",
    "PaneResult",
    "Variant",
    "VariantSpec",
    "VariantStore",
    "build_demo",
    "compare",
    "find_checkpoints",
    "generate_pair",
    "load_pair",
    "start_app",
    "stream_comparison",
    "stream_pair",
    "validate_prompt",
]


def __getattr__(name: str) -> Any:
    # Gradio is imported only when the page is actually built.
    if name == "build_demo":
        from .app import build_demo

        return build_demo
    if name == "start_app":
        from .launch import start_app

        return start_app
    raise AttributeError(f"module 'serve' has no attribute {name!r}")

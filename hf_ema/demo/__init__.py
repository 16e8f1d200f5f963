"""The offline demo: a tiny causal LM, a tokenizer trained on text that ships with Python, and the short training
run behind `hf-ema demo`. Needs the `demo` extra (`tokenizers`).

The names are imported on first access (PEP 562), so the CLI reads the demo's defaults without importing torch."""

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "DEFAULT_DECAY": "tiny_run",
    "DEFAULT_MAX_STEPS": "tiny_run",
    "RESULTS_NAME": "tiny_run",
    "train_tiny_run": "tiny_run",
    "TokenBlocks": "toy",
    "corpus_texts": "toy",
    "lm_datasets": "toy",
    "tiny_causal_lm": "toy",
    "train_tokenizer": "toy",
}

if TYPE_CHECKING:
    from .tiny_run import DEFAULT_DECAY, DEFAULT_MAX_STEPS, RESULTS_NAME, train_tiny_run
    from .toy import TokenBlocks, corpus_texts, lm_datasets, tiny_causal_lm, train_tokenizer

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_MAX_STEPS",
    "RESULTS_NAME",
    "TokenBlocks",
    "corpus_texts",
    "lm_datasets",
    "tiny_causal_lm",
    "train_tiny_run",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

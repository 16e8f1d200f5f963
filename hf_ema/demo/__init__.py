"""The offline demo: a tiny causal LM, a tokenizer trained on text that ships with Python, and the short training
run behind `hf-ema demo`. Needs the `demo` extra (`datasets`, `tokenizers`)."""

from .tiny_run import DEFAULT_DECAY, DEFAULT_MAX_STEPS, RESULTS_NAME, train_tiny_run
from .toy import corpus_texts, lm_datasets, tiny_causal_lm, train_tokenizer

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_MAX_STEPS",
    "RESULTS_NAME",
    "corpus_texts",
    "lm_datasets",
    "tiny_causal_lm",
    "train_tiny_run",
    "train_tokenizer",
]

"""Shared fixtures: a tokenizer trained once per session on the bundled corpus, tiny models from configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tokenizer():
    from hf_ema.offline import train_tokenizer

    return train_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def lm_data(tokenizer):
    """(train, eval) datasets of 32-token blocks from the bundled corpus."""
    from hf_ema.offline import lm_datasets

    return lm_datasets(tokenizer, block_size=32, max_train_blocks=256)


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer Llama (hidden 32) with tied embeddings."""
    from hf_ema.offline import tiny_causal_lm

    return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)

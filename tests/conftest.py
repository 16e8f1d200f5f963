"""Shared fixtures: a tokenizer trained once per session on the bundled corpus, tiny models from configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tokenizer():
    from hf_ema.demo.toy import train_tokenizer

    return train_tokenizer(vocab_size=512)


@pytest.fixture(scope="session")
def lm_data(tokenizer):
    """(train, eval) datasets of 32-token blocks from the bundled corpus."""
    from hf_ema.demo.toy import lm_datasets

    return lm_datasets(tokenizer, block_size=32, max_train_blocks=256)


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh 2-layer Llama (hidden 32) with tied embeddings."""
    from hf_ema.demo.toy import tiny_causal_lm

    return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tokenizer, lm_data):
    """A short Trainer + EMACallback run of the tiny Llama (checkpoints 4 and 8, final model). Read-only: tests that
    change files work on copies."""
    from _serve_runs import train_run

    return train_run(tmp_path_factory.mktemp("full"), tokenizer, lm_data)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tokenizer, lm_data):
    """The same as `full_run` for a LoRA adapter (base model saved in `base_model/`). Read-only."""
    from _serve_runs import train_run

    return train_run(tmp_path_factory.mktemp("lora"), tokenizer, lm_data, lora=True)

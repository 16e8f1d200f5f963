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


@pytest.fixture(scope="session")
def posthoc_run(tmp_path_factory, tokenizer, lm_data):
    """Like `full_run` with post-hoc EMA snapshots and three checkpoints (4, 8, 12, then the final model). Read-only."""
    from _serve_runs import train_run

    return train_run(tmp_path_factory.mktemp("posthoc"), tokenizer, lm_data, steps=12, posthoc=True)


@pytest.fixture(scope="session")
def posthoc_lora_run(tmp_path_factory, tokenizer, lm_data):
    """`posthoc_run` for a LoRA adapter (base model saved in `base_model/`). Read-only."""
    from _serve_runs import train_run

    return train_run(tmp_path_factory.mktemp("posthoc_lora"), tokenizer, lm_data, lora=True, steps=12, posthoc=True)


# ---------------------------------------------------------------------------------------------------- test tiers
#: Session fixtures that train with a real Trainer: a test using one belongs to the Trainer tier.
TRAINED_RUN_FIXTURES = {"full_run", "lora_run", "posthoc_run", "posthoc_lora_run"}
#: Markers of the tier above the unit tier.
NON_UNIT_MARKERS = {"trainer", "slow", "multiprocess", "browser", "hub"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trainer)


@pytest.fixture(autouse=True)
def _unit_tier_builds_no_trainer(request, monkeypatch):
    """A test outside the Trainer / multi-process / browser tier must not build a `Trainer`: mark it `trainer`."""
    if NON_UNIT_MARKERS & {mark.name for mark in request.node.iter_markers()}:
        yield
        return
    import transformers

    def refuse(self, *args, **kwargs):
        pytest.fail(f"{request.node.nodeid} builds a transformers.Trainer: mark it `@pytest.mark.trainer`")

    monkeypatch.setattr(transformers.Trainer, "__init__", refuse)
    yield

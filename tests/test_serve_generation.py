"""serve.generation and the raw-vs-EMA stream (`serve.compare.stream_pair`, the variants path with two variants):
raw and EMA generations against `model.generate` computed directly, validation, threads."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from hf_ema.errors import ConfigError, ConfigTypeError
from serve.compare import generate_pair, stream_pair
from serve.generation import GenerationSettings, validate_prompt
from serve.loading import CheckpointCatalog
from serve.variants import VariantStore

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def full_store(full_run, tmp_path_factory):
    """The raw and EMA variants of checkpoint-8 (a store over that one checkpoint)."""
    return VariantStore(CheckpointCatalog(full_run / "checkpoint-8", device="cpu"), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def lora_store(lora_run, tmp_path_factory):
    return VariantStore(CheckpointCatalog(lora_run / "checkpoint-8", device="cpu"), tmp_path_factory.mktemp("cache"))


def _direct_models(run, lora: bool):
    """The raw and EMA models loaded the plain transformers / peft way, independently of serve.loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoint-8"
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if not lora:
        return (
            tokenizer,
            AutoModelForCausalLM.from_pretrained(ckpt),
            AutoModelForCausalLM.from_pretrained(ckpt / "ema"),
        )
    from peft import PeftModel

    raw = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), ckpt)
    ema = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), ckpt / "ema")
    return tokenizer, raw, ema


def _generate(tokenizer, model, max_new_tokens: int, seed: int | None = None, **sampling) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    if seed is None:
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        # generate() samples with the global generator: seeding it matches our per-model generator.
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, **sampling)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_greedy_equals_generate(lora, full_run, lora_run, full_store, lora_store):
    run, store = (lora_run, lora_store) if lora else (full_run, full_store)
    tokenizer, raw_model, ema_model = _direct_models(run, lora)
    raw, ema = generate_pair(store, PROMPT, GenerationSettings(max_new_tokens=20, greedy=True))
    assert raw == _generate(tokenizer, raw_model, 20)
    assert ema == _generate(tokenizer, ema_model, 20)
    assert raw.strip() and ema.strip()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sampling_equals_seeded_generate(lora, full_run, lora_run, full_store, lora_store):
    run, store = (lora_run, lora_store) if lora else (full_run, full_store)
    tokenizer, raw_model, ema_model = _direct_models(run, lora)
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=1234)
    raw, ema = generate_pair(store, PROMPT, settings)
    assert raw == _generate(tokenizer, raw_model, 16, seed=1234, temperature=0.9, top_p=0.8)
    assert ema == _generate(tokenizer, ema_model, 16, seed=1234, temperature=0.9, top_p=0.8)
    again = generate_pair(store, PROMPT, settings)
    other = generate_pair(store, PROMPT, GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=99))
    assert again == (raw, ema)
    assert other != (raw, ema)


def test_stream_grows_token_by_token(full_store):
    steps = list(stream_pair(full_store, PROMPT, GenerationSettings(max_new_tokens=12, greedy=True)))
    assert len(steps) >= 12
    final = steps[-1]
    for raw, ema in steps:
        assert final[0].startswith(raw) and final[1].startswith(ema)
    assert len(steps[0][0]) < len(final[0])


def test_concurrent_requests_on_one_lora_model_do_not_mix_adapters(lora_store):
    # Both adapters live on one PeftModel; requests run the stacked adapters side by side.
    settings = GenerationSettings(max_new_tokens=12, greedy=True)
    expected = generate_pair(lora_store, PROMPT, settings)
    results: list = [None] * 4
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, generate_pair(lora_store, PROMPT, settings)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_settings_accept_form_numbers():
    s = GenerationSettings(max_new_tokens=7.0, seed=3.0, temperature=1, top_p=1)
    assert (s.max_new_tokens, s.seed, s.temperature, s.top_p) == (7, 3, 1.0, 1.0)
    assert isinstance(s.max_new_tokens, int) and isinstance(s.seed, int)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 0}, ConfigError, "`max_new_tokens` must be between 1 and 512, got 0"),
        ({"max_new_tokens": 513}, ConfigError, "`max_new_tokens` must be between 1 and 512, got 513"),
        ({"max_new_tokens": 100, "max_new_tokens_limit": 50}, ConfigError, "between 1 and 50"),
        ({"max_new_tokens": 2.5}, ConfigError, "`max_new_tokens` must be a whole number"),
        ({"max_new_tokens": "7"}, ConfigTypeError, "`max_new_tokens` must be an integer"),
        ({"seed": -1}, ConfigError, "`seed` must be between 0 and 4294967295, got -1"),
        ({"seed": 2**32}, ConfigError, "`seed` must be between"),
        ({"seed": 1.5}, ConfigError, "`seed` must be a whole number, got 1.5"),
        ({"seed": math.nan}, ConfigError, "`seed` must be a whole number"),
        ({"seed": None}, ConfigTypeError, "`seed` must be an integer, got None"),
        ({"seed": True}, ConfigTypeError, "`seed` must be an integer"),
        ({"temperature": 0}, ConfigError, r"`temperature` must be in \(0.0, 5.0\]"),
        ({"top_p": 1.5}, ConfigError, r"`top_p` must be in \(0.0, 1.0\]"),
        ({"greedy": "yes"}, ConfigTypeError, "`greedy` must be a bool"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        GenerationSettings(**kwargs)


@pytest.mark.parametrize("prompt", ["", "   \n", None])
def test_bad_prompt(prompt, full_store):
    with pytest.raises((ConfigError, ConfigTypeError), match="`prompt` must"):
        validate_prompt(prompt)
    with pytest.raises((ConfigError, ConfigTypeError), match="`prompt` must"):
        generate_pair(full_store, prompt, GenerationSettings(max_new_tokens=4))


def test_prompt_plus_new_tokens_must_fit_the_context(full_store):
    n_prompt = full_store.catalog.get().tokenizer(PROMPT, return_tensors="pt")["input_ids"].shape[1]
    fits = 256 - n_prompt
    with pytest.raises(ConfigError, match=f"`max_new_tokens` must be at most {fits} for this {n_prompt}-token prompt"):
        generate_pair(full_store, PROMPT, GenerationSettings(max_new_tokens=fits + 1, greedy=True))

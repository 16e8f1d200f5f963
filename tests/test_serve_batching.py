"""serve.batching: every way of running variants together against each variant's own forward pass.

Each stacking path (full models with stacked or per-variant linear layers, fused siblings, biases, stacked norms and
embeddings; LoRA adapters stacked; peft's mixed batches; one pass per adapter; one pass per model) is checked on
logits with one and two rows per variant, on decoding steps through the KV cache, and through `decode` and
`score_continuations` against `generate` and `model(input_ids, labels=...)` run on each variant alone.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from serve.batching import (
    AdapterVariants,
    SequentialAdapters,
    SequentialVariants,
    SingleVariant,
    StackedVariants,
    decode,
    make_adapter_batch,
    make_variant_batch,
    score_continuations,
    stack_adapters,
    stack_models,
)

PROMPT = "The return value of"


def tiny_models(tokenizer, arch: str, n: int = 3) -> list[torch.nn.Module]:
    """`n` tiny models of one architecture with different weights: norms and biases random too, so a mix-up between
    variants shows. `"llama-bias"` is Llama with biases on every linear layer (the fused q/k/v and gate/up paths with
    biases)."""
    from transformers import AutoModelForCausalLM

    from hf_ema.demo.toy import tiny_causal_lm

    models = [
        tiny_causal_lm(tokenizer, arch=arch.split("-")[0], hidden_size=32, num_layers=2, num_heads=4, seed=s)
        for s in range(n)
    ]
    if arch == "llama-bias":
        config = models[0].config
        config.attention_bias = config.mlp_bias = True
        models = []
        for seed in range(n):
            torch.manual_seed(seed)
            models.append(AutoModelForCausalLM.from_config(config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if name.endswith("bias") or (name.endswith("norm.weight") and model is not models[0]):
                    param.copy_(torch.rand(param.shape, generator=generator) + (0.5 if "norm" in name else -0.5))
    return [m.eval() for m in models]


def prompt_rows(tokenizer, rows: int) -> torch.Tensor:
    ids = tokenizer([PROMPT, " def f(x): return"], return_tensors="pt", padding="longest")["input_ids"][:, :4]
    return ids[:rows]


def assert_batch_equals_each_alone(batch, forwards, tokenizer, steps: int = 3) -> None:
    """`batch` on a variant-major batch gives, for each variant, what `forwards[v]` gives on its rows: without a
    cache (1 and 2 rows per variant) and on decoding steps through the batch's own KV cache."""
    with torch.inference_mode():
        for rows in (prompt_rows(tokenizer, 1), prompt_rows(tokenizer, 2)):
            together = batch.forward(rows.repeat(batch.n, 1))
            alone = torch.cat([forward(rows, None) for forward in forwards])
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
        # Decoding steps: the prompt, then one token per step, each variant with its own cache when run alone.
        ids = prompt_rows(tokenizer, 1)
        cache = batch.new_cache()
        caches: list = [None] * batch.n
        step = ids.repeat(batch.n, 1)
        for t in range(steps):
            together = batch.forward(step, cache, last_only=True)[:, -1]
            alone = []
            for v, forward in enumerate(forwards):
                logits, caches[v] = forward(step[v : v + 1], caches[v], with_cache=True)
                alone.append(logits[:, -1])
            torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
            step = torch.full((batch.n, 1), 7 + t)


def model_forward(model):
    """A variant's own forward: logits without a cache, or `(logits, cache)` growing its own cache."""

    def forward(ids, cache, with_cache=False):
        if not with_cache:
            return model(input_ids=ids, use_cache=False).logits
        if cache is None:
            from transformers import DynamicCache

            takes_config = "config" in inspect.signature(DynamicCache.__init__).parameters
            cache = DynamicCache(config=model.config) if takes_config else DynamicCache()
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5 calls the argument `cache` (the old `past_key_values` warns); older releases only know that.
        name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        logits = model(input_ids=ids, use_cache=True, **{name: cache}).logits
        return logits, cache

    return forward


@pytest.mark.parametrize("linear", ["bmm", "per-variant"])
@pytest.mark.parametrize("arch", ["llama", "llama-bias"])
def test_stacked_full_models_equal_each_alone(tokenizer, arch, linear):
    """Llama (fused q/k/v and gate/up, stacked norms and embeddings), without and with biases on its linear layers,
    with stacked or per-variant linear layers."""
    models = tiny_models(tokenizer, arch)
    batch = make_variant_batch(models, linear=linear)
    assert isinstance(batch, StackedVariants)
    kinds = {type(m).__name__ for m in batch.model.modules()}
    if linear == "bmm":
        assert {"_StackedLinear", "_FusedMember", "_StackedElementwise", "_StackedEmbedding"} <= kinds, kinds
    else:
        assert "_LinearPerVariant" in kinds and "_StackedLinear" not in kinds, kinds
    assert_batch_equals_each_alone(batch, [model_forward(m) for m in models], tokenizer)


def test_models_the_probe_refuses_run_one_by_one(tokenizer):
    """GPT-2's position embedding takes one row of positions for the whole batch, which a stacked embedding cannot
    split by variant: the probe refuses the stacked model and the variants run one after the other."""
    models = tiny_models(tokenizer, "gpt2")
    assert stack_models(models) is None
    batch = make_variant_batch(models)
    assert isinstance(batch, SequentialVariants)
    assert_batch_equals_each_alone(batch, [model_forward(m) for m in models], tokenizer)


def test_stacked_model_runs_no_variant_module_and_equals_each_alone(tokenizer):
    """The stacked model's norms and embeddings take every variant's rows in one call (no variant's own module runs,
    on decoding steps with one row per variant or on scoring passes with several), and its logits equal each model
    run alone."""
    models = tiny_models(tokenizer, "llama")
    stacked = stack_models(models)
    assert stacked is not None
    calls = []
    for model in models:
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        for rows in (prompt_rows(tokenizer, 1), prompt_rows(tokenizer, 2)):
            together = stacked(input_ids=rows.repeat(len(models), 1), use_cache=False).logits
            assert not calls
            alone = torch.cat([m(input_ids=rows, use_cache=False).logits for m in models])
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
            calls.clear()


def test_models_that_cannot_be_stacked_run_one_by_one(tokenizer):
    from hf_ema.demo.toy import tiny_causal_lm

    small = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).eval()
    wide = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=1).eval()
    assert stack_models([small, wide]) is None
    batch = make_variant_batch([small, wide])
    assert isinstance(batch, SequentialVariants)
    assert_batch_equals_each_alone(batch, [model_forward(small), model_forward(wide)], tokenizer)
    single = make_variant_batch([small])
    assert isinstance(single, SingleVariant)
    assert_batch_equals_each_alone(single, [model_forward(small)], tokenizer)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_decode_equals_generate_for_each_variant(tokenizer, greedy):
    """`decode` through the stacked model gives each variant's `generate` (greedy, or seeded sampling with
    temperature and top-p), and `score_own` gives each token's loss under its own model."""
    models = tiny_models(tokenizer, "llama")
    batch = make_variant_batch(models)
    ids = prompt_rows(tokenizer, 1)
    sampling = {} if greedy else {"temperature": 0.9, "top_p": 0.8}
    *_, state = decode(batch, ids, max_new_tokens=10, greedy=greedy, seed=7, score_own=True, **sampling)
    for model, tokens, own in zip(models, state.tokens, state.own_nll):
        torch.manual_seed(7)
        extra = {"do_sample": False} if greedy else {"do_sample": True, "top_k": 0, **sampling}
        expected = model.generate(input_ids=ids, max_new_tokens=10, **extra)[0, ids.shape[1] :].tolist()
        assert tokens == expected
        full = torch.tensor([ids[0].tolist() + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0, ids.shape[1] - 1 : -1], dim=-1)
        assert own == pytest.approx((-logp.gather(1, torch.tensor(tokens)[:, None]))[:, 0].tolist(), abs=1e-5)


def test_score_continuations_equal_each_model_loss(tokenizer, monkeypatch):
    """Every continuation (of two lengths) under every variant, over several passes (a small logits budget), with
    skipped pairs left out: each entry is `model(input_ids=prompt + text, labels=...).loss`."""
    import serve.batching.decoding as decoding

    models = tiny_models(tokenizer, "llama")
    batch = make_variant_batch(models)
    prompt = prompt_rows(tokenizer, 1)[0].tolist()
    texts = [[11, 12, 13], [14, 15, 16], [17, 18], [19, 20, 21]]
    monkeypatch.setattr(decoding, "_SCORE_LOGITS_BUDGET", 2 * 3 * 7 * len(tokenizer))  # two rows per pass
    nll, per_token = score_continuations(batch, prompt, texts, skip={(0, 1), (2, 3)})
    for v, model in enumerate(models):
        for j, text in enumerate(texts):
            if (v, j) in {(0, 1), (2, 3)}:
                assert torch.isnan(nll[v, j]) and per_token[v][j] == []
                continue
            ids = torch.tensor([prompt + text])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss.item()
            assert nll[v, j].item() == pytest.approx(loss, abs=1e-5)
            assert len(per_token[v][j]) == len(text)


# ------------------------------------------------------------------------------------------------- LoRA adapters
def lora_model(tokenizer, configs: dict):
    """A tiny Llama with one LoRA adapter per `configs` entry (name -> LoraConfig), each with random, distinct
    weights (a fresh adapter's B is zero, which would hide a mix-up), in eval mode."""
    from peft import get_peft_model

    from hf_ema.demo.toy import tiny_causal_lm

    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def adapter_forward(model, name: str):
    """The peft model's own forward with adapter `name` active."""
    forward = model_forward(model)

    def run(ids, cache, with_cache=False):
        model.set_adapter(name)
        return forward(ids, cache, with_cache)

    return run


def assert_each_adapter_decodes(batch, model, names: list[str], tokenizer) -> None:
    """Greedy decoding through `batch` gives, for each adapter, what `generate` gives with that adapter active."""
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    *_, state = decode(batch, prompt, max_new_tokens=8, greedy=True)
    for name, tokens in zip(names, state.tokens):
        model.set_adapter(name)
        expected = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :]
        assert tokens == expected.tolist()


def test_stacked_adapters_equal_each_adapter_alone(tokenizer):
    """LoRA adapters of different ranks, one of them not on every layer, run as one stacked model: each variant's
    rows equal what peft gives with that adapter active alone, with one row per variant and with two, and on decoding
    steps through the cache; the peft model is left as it was (same active adapter, no hooks)."""
    from peft import LoraConfig

    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]),
        "third": LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], use_rslora=True),
    }
    model = lora_model(tokenizer, configs)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    # The second list leaves down_proj's LoRA layer (only "second" targets it) to its base layer alone.
    for names in (["second", "first", "third", "second"], ["first", "third"]):
        model.set_adapter("first")
        stacked = stack_adapters(model, names)
        assert stacked is not None
        assert model.active_adapter == "first"
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
        batch = StackedVariants(stacked, len(names))
        assert_batch_equals_each_alone(batch, [adapter_forward(model, name) for name in names], tokenizer)
    names = ["second", "first", "third", "second"]
    batch = make_adapter_batch(model, names)
    assert isinstance(batch, StackedVariants)
    assert_each_adapter_decodes(batch, model, names, tokenizer)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # the tiny model ties them
@pytest.mark.parametrize("kind", ["embedding", "dora"])
def test_adapters_stacking_does_not_cover_run_through_peft(tokenizer, kind):
    """Adapters that are not plain LoRA on linear layers run through peft: LoRA on the embedding as peft's
    mixed-adapter batch, DoRA (which peft refuses in mixed batches) one pass per adapter. Each gives the adapter's
    own logits and text."""
    from peft import LoraConfig

    other = {"embedding": {"target_modules": ["q_proj", "embed_tokens"]}, "dora": {"use_dora": True}}[kind]
    configs = {
        "plain": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        kind: LoraConfig(r=4, lora_alpha=8, **{"target_modules": ["q_proj", "v_proj"], **other}),
    }
    model = lora_model(tokenizer, configs)
    names = ["plain", kind]
    assert stack_adapters(model, names) is None
    batch = make_adapter_batch(model, names)
    assert isinstance(batch, AdapterVariants if kind == "embedding" else SequentialAdapters)
    assert_batch_equals_each_alone(batch, [adapter_forward(model, name) for name in names], tokenizer)
    assert_each_adapter_decodes(batch, model, names, tokenizer)

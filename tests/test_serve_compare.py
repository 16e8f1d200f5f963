"""serve.variants / serve.batching / serve.compare: up to four weight variants decoded together, against models
loaded (or reconstructed, merged) independently with transformers / peft / hf_ema and run one at a time."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from hf_ema import CheckpointError, ConfigError
from serve.batching import (
    AdapterVariants,
    SequentialAdapters,
    SequentialVariants,
    StackedVariants,
    decode,
    make_variant_batch,
)
from serve.compare import TokenPieces, compare, first_divergence, stream_comparison, token_pieces
from serve.generation import GenerationSettings
from serve.loading import CheckpointCatalog
from serve.variants import VariantSpec, VariantStore

PROMPT = "The return value of"
FOUR = ["raw", "ema", "posthoc:0.15", "merge:mean:3"]


def independent_models(run, lora: bool, tmp_path):
    """The four variants of FOUR at the run's final step, built with the public hf_ema API and loaded plainly."""
    from transformers import AutoModelForCausalLM

    from hf_ema import merge_checkpoints, reconstruct

    posthoc = reconstruct(run, sigma_rel=0.15, out_dir=tmp_path / "posthoc", progress=False)
    merged = merge_checkpoints([run / f"checkpoint-{s}" for s in (4, 8, 12)], tmp_path / "merged", progress=False)
    folders = [run, run / "ema", posthoc, merged]
    if not lora:
        return [AutoModelForCausalLM.from_pretrained(f).eval() for f in folders]
    from peft import PeftModel

    return [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model"), f).eval() for f in folders
    ]


def own_scores(model, prompt_ids: list[int], continuation: list[int]) -> tuple[float, list[float]]:
    """`model(input_ids, labels=...)`'s loss on the continuation, and each continuation token's probability."""
    ids = torch.tensor([prompt_ids + continuation])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    logp = torch.log_softmax(out.logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)
    probs = logp.gather(1, torch.tensor(continuation).unsqueeze(1)).exp().squeeze(1).tolist()
    return out.loss.item(), probs


def test_variant_spec_short_forms_and_errors():
    for text in ["raw", "ema", "posthoc:0.15", "merge:mean:3", "merge:wsm:2", "ema@checkpoint-4"]:
        assert str(VariantSpec.parse(text)) == text
    assert VariantSpec("merge", k=3.0).method == "mean" and VariantSpec("merge", k=3.0).k == 3
    bad = [
        (lambda: VariantSpec.parse("posthoc:wide"), "`sigma_rel` must be a number, got 'wide'"),
        (lambda: VariantSpec.parse("median"), "`variant` must be raw, ema, posthoc:SIGMA_REL"),
        (lambda: VariantSpec("merge", k=1), "`k` (checkpoints to merge) must be a whole number >= 2, got 1"),
        (lambda: VariantSpec("merge", k=3, method="median"), "`method` must be one of ['mean', 'wsm']"),
        (lambda: VariantSpec("posthoc"), "`sigma_rel` must be given"),
        (lambda: VariantSpec("soup"), "`kind` must be one of"),
    ]
    for call, message in bad:
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value)


def test_first_divergence_and_token_pieces(tokenizer):
    assert first_divergence([[1, 2, 3], [1, 2, 4]]) == 2
    assert first_divergence([[1, 2], [1, 2, 3]]) == 2  # one text ended earlier
    assert first_divergence([[1, 2], [1, 2]]) is None and first_divergence([[1]]) is None
    ids = tokenizer("The for statement, élan", add_special_tokens=False)["input_ids"]
    assert "".join(token_pieces(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (word-start spaces as a marker the decoder turns back into spaces, and drops
    at the start of a text): decoding a window of tokens on its own differs from decoding it in context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_ema.demo.toy import corpus_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus_texts()[:40], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_token_pieces_as_tokens_arrive_equal_token_pieces(kind, tokenizer):
    """`TokenPieces` (a short window decoded per token) ends with exactly `token_pieces` and the full decode: on
    multi-byte characters split across tokens, end-of-sequence tokens inside and at the end, a text that ends inside
    a character, and a tokenizer whose windows decode differently from the whole (where it falls back)."""
    tok = tokenizer if kind == "byte-level" else metaspace_tokenizer()
    text = "The for statement, élan, naïve café 東京 🙂 — " * 6 + "def f(x):\n    return x ** 2\n" * 4
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    cases = [ids, ids[:37] + [eos] + ids[37:90] + [eos], ids + [eos]]
    if kind == "byte-level":
        cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
        cases.append(ids[:cut])  # ends inside a multi-byte character
    fell_back = 0
    for tokens in cases:
        stream = TokenPieces(tok)
        for k in range(0, len(tokens), 3):  # a few tokens at a time, as decoding steps deliver them
            stream.extend(tokens[k : k + 3])
            whole = tok.decode(tokens[: k + 3], skip_special_tokens=True)
            if kind == "byte-level":  # exact as it streams (a character split across tokens waits for its end)
                assert stream.text == whole.rstrip("\ufffd")
            fell_back += stream.text != whole
        stream.finish()
        assert stream.pieces == token_pieces(tok, tokens)
        assert stream.text == tok.decode(tokens, skip_special_tokens=True)
    if kind == "metaspace":
        assert fell_back  # the windows did decode differently: the exact result came from the fallback


def test_panes_with_the_same_text_share_their_scores(posthoc_run, tmp_path):
    """Two panes of one variant (and any panes whose greedy texts agree) get the scores each model gives the text,
    as `model(input_ids, labels=...)` gives them."""
    from transformers import AutoModelForCausalLM

    store = VariantStore(CheckpointCatalog(posthoc_run, device="cpu"), cache_dir=tmp_path / "cache")
    settings = GenerationSettings(max_new_tokens=10, greedy=True)
    result = compare(store, PROMPT, ["raw", "ema", "raw"], settings, reference=" the function")
    assert result.panes[0].tokens == result.panes[2].tokens
    models = [AutoModelForCausalLM.from_pretrained(f).eval() for f in (posthoc_run, posthoc_run / "ema", posthoc_run)]
    prompt_ids = store.catalog.get().tokenizer(PROMPT)["input_ids"]
    for i, model in enumerate(models):
        for j, pane in enumerate(result.panes):
            assert result.nll[i][j] == pytest.approx(own_scores(model, prompt_ids, pane.tokens)[0], abs=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_four_variants_sampled_together_equal_each_alone(lora, posthoc_run, posthoc_lora_run, tmp_path):
    """Seeded sampling of the four variants in one batch gives what `generate` gives for each alone, and the scores
    are the losses `model(input_ids, labels=...)` gives."""
    run = posthoc_lora_run if lora else posthoc_run
    store = VariantStore(CheckpointCatalog(run, device="cpu"), cache_dir=tmp_path / "cache")
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=1234)
    result = compare(store, PROMPT, FOUR, settings, reference=" the function")
    assert result.done and not any(p.error for p in result.panes)
    # One batched forward per token, by one stacked model; for LoRA it runs the PEFT model's own base weights (not a
    # copy per variant) and adds only the adapters' stacked low-rank weights.
    batch = store.batch(None, [store.resolve(None, VariantSpec.parse(s)) for s in FOUR])
    assert isinstance(batch, StackedVariants)
    assert store.batch(None, [store.resolve(None, VariantSpec.parse(s)) for s in FOUR]) is batch  # built once
    if lora:
        base = store.catalog.get().models["raw"].get_base_model()
        shared = {p.data_ptr() for p in base.parameters()}
        added = sum(p.numel() for p in batch.model.parameters() if p.data_ptr() not in shared)
        assert 0 < added < 0.1 * sum(p.numel() for p in base.parameters())

    models = independent_models(run, lora, tmp_path)
    tokenizer = store.catalog.get().tokenizer
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids])
    expected = []
    for model in models:
        torch.manual_seed(1234)
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=0.9, top_p=0.8)
        expected.append(out[0, len(prompt_ids) :].tolist())
    assert [p.tokens for p in result.panes] == expected
    assert result.divergence == first_divergence(expected)
    reference = tokenizer(" the function", add_special_tokens=False)["input_ids"]
    for i, model in enumerate(models):
        for j, tokens in enumerate(expected):
            loss, probs = own_scores(model, prompt_ids, tokens)
            assert result.nll[i][j] == pytest.approx(loss, abs=1e-5)
            if i == j:
                assert result.panes[i].probs == pytest.approx(probs, abs=1e-5)
        assert result.reference_nll[i] == pytest.approx(own_scores(model, prompt_ids, reference)[0], abs=1e-5)
    # The commands that produce each pane's weights.
    assert result.panes[1].command == f"hf-ema push {run} --repo-id <user>/<model>"
    assert result.panes[2].command.startswith(f"hf-ema posthoc {run} --sigma-rel 0.15 --out ")
    assert result.panes[3].command.startswith(
        f"hf-ema merge {run}/checkpoint-4 {run}/checkpoint-8 {run}/checkpoint-12 --method mean --out "
    )


def test_models_that_cannot_be_stacked_run_one_by_one(tokenizer):
    from hf_ema.demo.toy import tiny_causal_lm

    small = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).eval()
    wide = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=1).eval()
    batch = make_variant_batch([small, wide])
    assert isinstance(batch, SequentialVariants)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    *_, state = decode(batch, ids, max_new_tokens=8, greedy=True)
    for model, tokens in zip([small, wide], state.tokens):
        assert tokens == model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()


def test_stacked_model_runs_no_variant_module_and_equals_each_alone(tokenizer):
    """The stacked model's norms and embeddings take every variant's rows in one call (no variant's own module runs,
    on decoding steps with one row per variant or on scoring passes with several), and its logits equal each model
    run alone."""
    from hf_ema.demo.toy import tiny_causal_lm
    from serve.batching import stack_models

    models = [tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=s).eval() for s in (0, 1, 2)]
    for model in models[1:]:  # distinct norm weights, so a mix-up between variants shows
        with torch.no_grad():
            for module in model.modules():
                if "RMSNorm" in type(module).__name__:
                    module.weight.uniform_(0.5, 1.5)
    stacked = stack_models(models)
    assert stacked is not None
    calls = []
    for model in models:
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(lambda *_: calls.append(1))
    ids = tokenizer([PROMPT, " def f(x): return"], return_tensors="pt", padding="longest")["input_ids"][:, :4]
    with torch.inference_mode():
        for rows in (ids[:1], ids):  # one row per variant, and two
            batch = rows.repeat(len(models), 1)
            together = stacked(input_ids=batch, use_cache=False).logits
            assert not calls
            alone = torch.cat([m(input_ids=rows, use_cache=False).logits for m in models])
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
            calls.clear()


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
    rows equal what peft gives with that adapter active alone, with one row per variant and with two, and the peft
    model is left as it was (same active adapter, no hooks)."""
    from peft import LoraConfig

    from serve.batching import make_adapter_batch, stack_adapters

    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]),
        "third": LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"], use_rslora=True),
    }
    model = lora_model(tokenizer, configs)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    ids = tokenizer([PROMPT, " def f(x): return"], return_tensors="pt", padding="longest")["input_ids"][:, :4]
    # The second list leaves down_proj's LoRA layer (only "second" targets it) to its base layer alone.
    for names in (["second", "first", "third", "second"], ["first", "third"]):
        model.set_adapter("first")
        stacked = stack_adapters(model, names)
        assert stacked is not None
        assert model.active_adapter == "first"
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
        with torch.inference_mode():
            for rows in (ids[:1], ids):
                together = stacked(input_ids=rows.repeat(len(names), 1), use_cache=False).logits
                alone = []
                for name in names:
                    model.set_adapter(name)
                    alone.append(model(input_ids=rows, use_cache=False).logits)
                torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    names = ["second", "first", "third", "second"]
    # Decoding through the batch gives each adapter's own greedy text.
    batch = make_adapter_batch(model, names)
    assert isinstance(batch, StackedVariants)
    assert_each_adapter_decodes(batch, model, names, tokenizer)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # the tiny model ties them
@pytest.mark.parametrize("kind", ["embedding", "dora"])
def test_adapters_stacking_does_not_cover_run_through_peft(tokenizer, kind):
    """Adapters that are not plain LoRA on linear layers run through peft: LoRA on the embedding as peft's
    mixed-adapter batch, DoRA (which peft refuses in mixed batches) one pass per adapter. Each gives the adapter's
    own text."""
    from peft import LoraConfig

    from serve.batching import make_adapter_batch, stack_adapters

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
    assert_each_adapter_decodes(batch, model, names, tokenizer)


def test_batched_forward_passes_warn_nothing(full_run):
    """No `past_key_values` deprecation (or any other warning) on the decoding and scoring passes."""
    store = VariantStore(CheckpointCatalog(full_run, device="cpu"))
    variants = [store.resolve(None, VariantSpec.parse(s)) for s in ("raw", "ema")]
    batch = store.batch(None, variants)
    ids = store.catalog.get().tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        *_, state = decode(batch, ids, max_new_tokens=6, greedy=True)
        from serve.batching import score_continuations

        score_continuations(batch, ids[0].tolist(), state.tokens)


def broken_run(full_run, tmp_path, tokenizer):
    """A copy of `full_run` (no post-hoc snapshots) whose checkpoint-4 holds a model of another width."""
    from hf_ema.demo.toy import tiny_causal_lm

    run = tmp_path / "broken"
    shutil.copytree(full_run, run)
    wide = tiny_causal_lm(tokenizer, hidden_size=48, num_layers=2, num_heads=4, seed=0)
    for name in ("model.safetensors", "config.json"):
        (run / "checkpoint-4" / name).unlink()
    wide.save_pretrained(run / "checkpoint-4")
    return run


def test_variants_that_cannot_be_built_say_why_and_the_others_run(full_run, tmp_path, tokenizer):
    run = broken_run(full_run, tmp_path, tokenizer)
    store = VariantStore(CheckpointCatalog(run, device="cpu"), cache_dir=tmp_path / "cache")
    cases = [
        ("posthoc:0.15", CheckpointError, "holds no post-hoc EMA snapshots"),
        ("posthoc:0.5", ConfigError, "`sigma_rel` must be in (0, 0.2887), got 0.5"),
        ("merge:mean:2", CheckpointError, "checkpoint-4"),
        ("merge:wsm:5", ConfigError, f"`k` must be at most 2 (the checkpoint-N folders in `{run}`), got 5"),
        ("ema@checkpoint-99", ConfigError, "`checkpoint` must be one of"),
    ]
    for text, error, message in cases:
        with pytest.raises(error) as info:
            store.resolve(None, VariantSpec.parse(text))
        assert message in str(info.value), str(info.value)
    with pytest.raises(CheckpointError, match=r"EMACallback\(posthoc=True\)"):
        store.resolve(None, VariantSpec.parse("posthoc:0.15"))
    assert not any(tmp_path.joinpath("cache").iterdir())  # nothing half-written

    settings = GenerationSettings(max_new_tokens=6, greedy=True)
    *_, result = stream_comparison(store, PROMPT, ["posthoc:0.15", "raw", "merge:mean:2", "ema"], settings)
    assert [bool(p.error) for p in result.panes] == [True, False, True, False]
    assert result.scored == [1, 3] and len(result.nll) == 2 and result.done
    with pytest.raises(ConfigError, match="`sigma_rel` must be in"):
        compare(store, PROMPT, ["posthoc:0.5"], settings)  # no pane could be built: the first error is raised

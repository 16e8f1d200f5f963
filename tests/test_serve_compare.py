"""serve.variants / serve.compare / serve.tokens: up to four weight variants built, decoded together and scored,
against models loaded (or reconstructed, merged) independently with transformers / peft / hf_ema and run one at a
time. The ways of batching themselves are tested in test_serve_batching.py."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from hf_ema import CheckpointError, ConfigError
from serve.batching import StackedVariants, decode, score_continuations
from serve.compare import compare, stream_comparison
from serve.generation import GenerationSettings
from serve.loading import CheckpointCatalog
from serve.specs import VariantSpec
from serve.tokens import TokenPieces, first_divergence, token_pieces
from serve.variants import VariantStore

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
    for text in ["raw", "ema", "ema-plain", "posthoc:0.15", "merge:mean:3", "merge:wsm:2", "ema@checkpoint-4"]:
        assert str(VariantSpec.parse(text)) == text
    assert VariantSpec("merge", k=3.0).method == "mean" and VariantSpec("merge", k=3.0).k == 3
    bad = [
        (lambda: VariantSpec.parse("posthoc:wide"), "`sigma_rel` must be a number, got 'wide'"),
        (lambda: VariantSpec.parse("median"), "`variant` must be raw, ema, ema-plain, posthoc:SIGMA_REL"),
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


def test_batched_forward_passes_warn_nothing(full_run):
    """No `past_key_values` deprecation (or any other warning) on the decoding and scoring passes."""
    store = VariantStore(CheckpointCatalog(full_run, device="cpu"))
    variants = [store.resolve(None, VariantSpec.parse(s)) for s in ("raw", "ema")]
    batch = store.batch(None, variants)
    ids = store.catalog.get().tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        *_, state = decode(batch, ids, max_new_tokens=6, greedy=True)
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


@pytest.mark.trainer
def test_bema_run_shows_bema_beside_its_plain_ema(tmp_path, tokenizer, lm_data):
    """A BEMA run's `ema` pane is BEMA (its `ema/` folder) and `ema-plain` the EMA under the correction
    (`hf_ema.write_plain_ema`), decoded together; each equals `generate` of the folder loaded alone."""
    from _serve_runs import train_run
    from transformers import AutoModelForCausalLM

    from hf_ema import write_plain_ema
    from serve.variants import is_bema

    run = train_run(tmp_path / "run", tokenizer, lm_data, bema=True)
    catalog = CheckpointCatalog(run, device="cpu")
    assert is_bema(catalog.ref())
    store = VariantStore(catalog, cache_dir=tmp_path / "cache")
    result = compare(store, PROMPT, ["raw", "ema", "ema-plain"], GenerationSettings(max_new_tokens=12, greedy=True))
    assert result.done and not any(p.error for p in result.panes)
    assert result.panes[1].label.startswith("BEMA · ") and result.panes[2].label.startswith("plain EMA")
    plain = write_plain_ema(run / "ema", tmp_path / "plain")
    prompt_ids = store.catalog.get().tokenizer(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids])
    for pane, folder in zip(result.panes, (run, run / "ema", plain)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert pane.tokens == out[0, len(prompt_ids) :].tolist(), pane.label
    assert result.panes[1].tokens != result.panes[2].tokens or result.nll[1][1] != result.nll[2][1]

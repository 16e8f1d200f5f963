"""EMA evaluation beside the raw one in real `Trainer` runs (hf_ema.trainer.evaluation, EMACallback(eval_ema=...))."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _trainer_args import cpu_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_ema import EMACallback
from hf_ema.trainer.evaluation import EMAEvaluator

pytestmark = pytest.mark.trainer  # every test here trains with a real Trainer


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=2,
    )
    base.update(kw)
    return cpu_args(out, **base)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(before: dict[str, torch.Tensor], model) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed across evaluation"


def _eval_loss_of(folder: Path, eval_ds, out: Path, compute_metrics=None, preprocess=None) -> dict[str, float]:
    """Evaluate a saved model with a fresh Trainer that knows nothing of hf-ema."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    trainer = Trainer(
        model=model,
        args=_args(out),
        eval_dataset=eval_ds,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    return trainer.evaluate()


def _state(out: Path) -> dict:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())


def test_eval_ema_loss_matches_saved_ema_and_raw_weights_untouched(tmp_path, tiny_model, tokenizer, lm_data):
    train_ds, eval_ds = lm_data
    eval_ds = eval_ds.select(range(48))
    out = tmp_path / "run"
    callback = EMACallback(decay=0.7, start_step=2)
    trainer = Trainer(
        model=tiny_model,
        args=_args(out, max_steps=6, eval_strategy="steps", eval_steps=2, save_steps=2),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    checks = []
    original_evaluate = trainer.evaluate

    def checked_evaluate(*args, **kwargs):
        raw = _snapshot(trainer.model)
        shadow = [t.clone() for t in callback.ema.shadow]
        metrics = original_evaluate(*args, **kwargs)
        _assert_bit_identical(raw, trainer.model)
        assert all(torch.equal(a, b) for a, b in zip(shadow, callback.ema.shadow))
        checks.append(trainer.state.global_step)
        return metrics

    trainer.evaluate = checked_evaluate
    trainer.train()
    assert checks == [2, 4, 6]

    history = _state(out)["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    for entry in evals:
        # Same log entry, as TensorBoard / W&B receive it.
        assert "eval_ema_loss" in entry and "eval_ema_is_raw" in entry
        step = entry["step"]
        folder = out / f"checkpoint-{step}"
        ref_ema = _eval_loss_of(folder / "ema", eval_ds, tmp_path / "ref")["eval_loss"]
        ref_raw = _eval_loss_of(folder, eval_ds, tmp_path / "ref")["eval_loss"]
        assert entry["eval_ema_loss"] == pytest.approx(ref_ema, rel=1e-6, abs=1e-7)
        # The checkpoint the Trainer wrote after evaluating holds the raw weights, not the EMA.
        assert entry["eval_loss"] == pytest.approx(ref_raw, rel=1e-6, abs=1e-7)
        if step <= 2:  # start_step: the EMA only copies the weights, the raw numbers are reported, marked
            assert entry["eval_ema_is_raw"] == 1.0
            assert entry["eval_ema_loss"] == entry["eval_loss"]
        else:
            assert entry["eval_ema_is_raw"] == 0.0 and entry["eval_ema_runtime"] > 0
            assert abs(entry["eval_ema_loss"] - entry["eval_loss"]) > 1e-4


def _accuracy(pred) -> dict[str, float]:
    preds, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    mask = labels != -100
    return {"acc": float((preds[mask] == labels[mask]).mean())}


def _argmax(logits, labels):
    return logits.argmax(-1)


def test_compute_metrics_keys_raising_metric_and_after_train(tmp_path, tiny_model, tokenizer, lm_data):
    train_ds, eval_ds = lm_data
    eval_ds = eval_ds.select(range(32))
    callback = EMACallback(decay=0.5)
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path / "run", max_steps=3, save_strategy="no"),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
        compute_metrics=_accuracy,
        preprocess_logits_for_metrics=_argmax,
    )
    trainer.train()

    # After train() the EMA still exists: evaluate() reports it, for every compute_metrics key.
    metrics = trainer.evaluate()
    assert metrics["eval_ema_is_raw"] == 0.0
    ema_folder = tmp_path / "ema_copy"
    callback.save(ema_folder)
    ref = _eval_loss_of(ema_folder, eval_ds, tmp_path / "ref", _accuracy, _argmax)
    assert metrics["eval_ema_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    assert metrics["eval_ema_acc"] == pytest.approx(ref["eval_acc"], abs=1e-12)
    assert "eval_acc" in metrics and "eval_ema_model_preparation_time" not in metrics
    # Evaluating a swapped-in EMA by hand under an `ema` prefix does not swap a second time.
    with callback.ema.swapped():
        manual = trainer.evaluate(metric_key_prefix="ema_check")
    assert not any(k.startswith("ema_check_ema") for k in manual)
    assert manual["ema_check_loss"] == pytest.approx(metrics["eval_ema_loss"], rel=1e-6)

    # A metric function that raises during the EMA pass: the raw weights come back, bit for bit.
    calls = []

    def failing(pred):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("metric failed")
        return _accuracy(pred)

    trainer.compute_metrics = failing
    raw = _snapshot(trainer.model)
    shadow = [t.clone() for t in callback.ema.shadow]
    with pytest.raises(RuntimeError, match="metric failed"):
        trainer.evaluate()
    assert len(calls) == 2 and not callback.evaluator.swapped_in
    _assert_bit_identical(raw, trainer.model)
    assert all(torch.equal(a, b) for a, b in zip(shadow, callback.ema.shadow))

    # predict() is left alone.
    trainer.compute_metrics = None
    pred_metrics = trainer.predict(eval_ds).metrics
    assert "test_loss" in pred_metrics and not any("_ema" in k for k in pred_metrics)


def test_best_model_by_eval_ema_loss_and_swap_at_end(tmp_path, tiny_model, tokenizer, lm_data):
    train_ds, eval_ds = lm_data
    eval_ds = eval_ds.select(range(48))
    out = tmp_path / "run"
    callback = EMACallback(decay=0.8, swap_at_end=True)
    trainer = Trainer(
        model=tiny_model,
        args=_args(
            out,
            max_steps=10,
            learning_rate=2e-2,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            eval_on_start=True,
            load_best_model_at_end=True,
            metric_for_best_model="eval_ema_loss",
            greater_is_better=False,
        ),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_ema_loss" in e]
    # eval_on_start runs before any EMA update: raw numbers, marked.
    assert evals[0]["step"] == 0 and evals[0]["eval_ema_is_raw"] == 1.0
    assert evals[0]["eval_ema_loss"] == evals[0]["eval_loss"]
    during = [e for e in evals if e["step"] > 0]
    losses = np.array([e["eval_ema_loss"] for e in during])
    expected = during[int(np.argmin(losses))]["step"]  # first minimum, as the Trainer's strict `<`
    # In this (seeded) run the raw loss bottoms out earlier than the EMA's, so the choice is not the raw one.
    raw_best = during[int(np.argmin([e["eval_loss"] for e in during]))]["step"]
    assert raw_best != expected
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{expected}")
    assert trainer.state.best_metric == pytest.approx(float(losses.min()))

    # swap_at_end + load_best_model_at_end: the final model is the best checkpoint's EMA, its raw weights in raw/.
    best = out / f"checkpoint-{expected}"
    best_ema = load_file(str(best / "ema" / "model.safetensors"))
    best_raw = load_file(str(best / "model.safetensors"))
    raw_dir = load_file(str(out / "raw" / "model.safetensors"))
    state = trainer.model.state_dict()
    for k, v in best_ema.items():
        assert torch.equal(state[k], v), k
        assert torch.equal(raw_dir[k], best_raw[k]), k
    assert (out / "raw" / "tokenizer.json").is_file()
    trainer.save_model(str(out / "published"))
    published = load_file(str(out / "published" / "model.safetensors"))
    assert all(torch.equal(published[k], v) for k, v in best_ema.items())
    # The model is the EMA now: evaluate() reports it once, with no eval_ema_ keys.
    metrics = trainer.evaluate()
    assert not any(k.startswith("eval_ema") for k in metrics)
    assert math.isclose(metrics["eval_loss"], trainer.state.best_metric, rel_tol=1e-6)


def test_swap_at_end_last_ema(tmp_path, tiny_model, tokenizer, lm_data):
    train_ds, _ = lm_data
    out = tmp_path / "run"
    callback = EMACallback(decay=0.6, swap_at_end=True)
    trainer = Trainer(
        model=tiny_model,
        args=_args(out, max_steps=4, save_steps=4),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    ckpt = out / "checkpoint-4"
    ema = load_file(str(ckpt / "ema" / "model.safetensors"))
    raw = load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    state = trainer.model.state_dict()
    raw_dir = load_file(str(out / "raw" / "model.safetensors"))
    for k in ema:
        assert torch.equal(state[k], ema[k]), k
        assert torch.equal(raw_dir[k], raw[k]), k
    # output_dir/ema (save_final) is kept beside raw/.
    assert (out / "ema" / "ema_state.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "raw")
    assert torch.equal(reloaded.model.embed_tokens.weight, raw["model.embed_tokens.weight"])


def test_evaluator_install_is_idempotent_and_uninstalls(tiny_model, tmp_path):
    trainer = Trainer(model=tiny_model, args=_args(tmp_path))
    evaluator = EMAEvaluator(lambda: None)
    evaluator.install(trainer)
    wrapper = trainer.evaluation_loop
    evaluator.install(trainer)
    assert trainer.evaluation_loop is wrapper
    evaluator.uninstall()
    assert "evaluation_loop" not in trainer.__dict__
    assert trainer.evaluation_loop.__func__ is Trainer.evaluation_loop

"""EMACallback inside real Trainer runs on a tiny Llama: values, files, resume, LoRA, bf16, errors."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from _trainer_args import cpu_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, pipeline

from hf_ema import CheckpointError, ConfigError, EMACallback, EMAConfig, save_ema
from hf_ema.demo.toy import tiny_causal_lm

pytestmark = pytest.mark.trainer  # every test here trains with a real Trainer


class RecordWeights(TrainerCallback):
    """Records the raw weights at the start and after every optimizer step, in float64."""

    def __init__(self):
        self.initial = None
        self.after_step = []

    @staticmethod
    def _snapshot(model):
        return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = self._snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(self._snapshot(model))


def reference_ema(recorder, cfg: EMAConfig):
    """EMA of the recorded weights, written from the formula: ema = b*ema + (1-b)*theta every k steps."""
    ema = dict(recorder.initial)
    k = cfg.update_every
    for step, weights in enumerate(recorder.after_step, start=1):
        if step % k:
            continue
        beta = cfg.decay**k
        ema = {n: beta * ema[n] + (1 - beta) * weights[n] for n in ema}
    return ema


def make_args(tmp_path, **overrides):
    kwargs = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3, save_steps=6, logging_steps=2)
    kwargs.update(overrides)
    return cpu_args(tmp_path, **kwargs)


def run(tmp_path, model, train_ds, tokenizer, cfg, resume=None, **arg_overrides):
    recorder = RecordWeights()
    callback = EMACallback(cfg)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, **arg_overrides),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[callback, recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, recorder


@pytest.mark.parametrize(
    "cfg, overrides",
    [
        (EMAConfig(decay=0.8), {}),
        (EMAConfig(decay=0.8), {"gradient_accumulation_steps": 2}),
        (EMAConfig(decay=0.7, update_every=3), {"max_steps": 9, "save_steps": 9}),
    ],
    ids=["every_step", "grad_accum_2", "update_every_3"],
)
def test_saved_ema_equals_independent_reference(tmp_path, tiny_model, lm_data, tokenizer, cfg, overrides):
    trainer, callback, recorder = run(tmp_path, tiny_model, lm_data[0], tokenizer, cfg, **overrides)
    steps = trainer.state.global_step
    assert len(recorder.after_step) == steps  # one update per optimizer step, not per micro-batch
    expected = reference_ema(recorder, cfg)
    saved = load_file(str(tmp_path / f"checkpoint-{steps}" / "ema" / "model.safetensors"))
    for name, value in expected.items():
        assert (saved[name].double() - value).abs().max().item() <= 1e-6, name
    # The final copy in output_dir/ema is the same EMA.
    final = load_file(str(tmp_path / "ema" / "model.safetensors"))
    assert all(torch.equal(final[n], saved[n]) for n in saved)
    # ... and it really differs from the raw weights.
    raw = load_file(str(tmp_path / f"checkpoint-{steps}" / "model.safetensors"))
    assert not torch.equal(raw["model.layers.0.mlp.up_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"])
    # `ema_decay` is logged (in the same entry as the loss) from the first EMA update on.
    decays = [e.get("ema_decay") for e in trainer.state.log_history if "loss" in e and e["step"] >= cfg.update_every]
    assert decays and all(d == pytest.approx(cfg.decay**cfg.update_every) for d in decays)


def test_ema_folder_loads_and_generates(tmp_path, tiny_model, lm_data, tokenizer):
    run(tmp_path, tiny_model, lm_data[0], tokenizer, EMAConfig(decay=0.5))
    ema_dir = tmp_path / "checkpoint-6" / "ema"
    ema_model, info = AutoModelForCausalLM.from_pretrained(ema_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert ema_model.config.tie_word_embeddings
    assert torch.equal(ema_model.lm_head.weight, ema_model.model.embed_tokens.weight)
    raw_model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-6")
    ids = tokenizer("def f(x): return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(ema_model(ids).logits, raw_model(ids).logits)
    generator = pipeline("text-generation", model=str(ema_dir), device="cpu")
    out = generator("The for statement", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The for statement")
    assert len(out[0]["generated_text"]) > len("The for statement")


def test_max_shard_size_splits_every_ema_folder(tmp_path, tiny_model, lm_data, tokenizer):
    """`EMACallback(max_shard_size=...)`: every `ema/` is split into files of at most that size with an index, and
    loads with `from_pretrained` to the same weights as an unsplit save of the same EMA."""
    with pytest.raises(ConfigError, match=r"`max_shard_size` must be a positive size .*, got '5 parsecs'"):
        EMACallback(decay=0.5, max_shard_size="5 parsecs")
    callback = EMACallback(decay=0.5, max_shard_size="100KB")
    trainer = Trainer(
        model=tiny_model,
        args=make_args(tmp_path / "run"),
        train_dataset=lm_data[0],
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    whole = save_ema(callback.ema, tmp_path / "whole")
    expected = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    for folder in (tmp_path / "run" / "checkpoint-6" / "ema", tmp_path / "run" / "ema"):
        files = sorted(folder.glob("model-*-of-*.safetensors"))
        assert len(files) > 1 and (folder / "model.safetensors.index.json").is_file()
        assert not (folder / "model.safetensors").exists()
        # A file holds at most 100 KB of tensors (plus its header), unless it is one tensor bigger than that.
        assert all(len(load_file(str(f))) == 1 or f.stat().st_size <= 100_000 + 4096 for f in files)
        loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_lora_averages_only_adapter(tmp_path, tiny_model, lm_data, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer, callback, recorder = run(tmp_path, model, lm_data[0], tokenizer, EMAConfig(decay=0.6), learning_rate=2e-2)
    assert callback.ema.names and all("lora_" in n for n in callback.ema.names)
    expected = reference_ema(recorder, EMAConfig(decay=0.6))
    assert set(expected) == set(callback.ema.names)
    ema_dir = tmp_path / "checkpoint-6" / "ema"
    assert (ema_dir / "adapter_config.json").is_file() and (ema_dir / "adapter_model.safetensors").is_file()
    assert not (ema_dir / "model.safetensors").exists()
    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    loaded = PeftModel.from_pretrained(base, ema_dir)
    params = dict(loaded.named_parameters())
    for name, value in expected.items():
        assert (params[name].double() - value).abs().max().item() <= 1e-6, name


def test_bf16_weights_keep_an_fp32_ema_that_moves_below_bf16_resolution(tmp_path, tokenizer, lm_data):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0, dtype=torch.bfloat16)
    cfg = EMAConfig(decay=0.999)
    trainer, callback, recorder = run(tmp_path, model, lm_data[0], tokenizer, cfg, learning_rate=1e-2)
    name = "model.layers.0.mlp.up_proj.weight"
    init = recorder.initial[name]
    raw = recorder.after_step[-1][name]
    ema = callback.ema.shadow[callback.ema.names.index(name)]
    assert ema.dtype == torch.float32
    # Where every EMA increment (1 - 0.999) * (raw - ema) is below half a bf16 ulp of the weight, a bf16 EMA
    # cannot move at all. Most weights are in that regime here.
    below = 1e-3 * (raw - init).abs().max(dim=-1, keepdim=True).values.expand_as(init) < init.abs() * 2.0**-9
    below &= raw != init
    assert below.float().mean().item() > 0.3
    # The fp32 EMA moved there, and everywhere equals the reference computed in float64.
    assert (ema.double() != init)[below].float().mean().item() > 0.99
    expected = reference_ema(recorder, cfg)[name]
    assert (ema.double() - expected).abs().max().item() <= 1e-6
    # A bf16 EMA fed the same weights stays stuck at its starting value there (what this test guards against).
    bf16_ema = init.to(torch.bfloat16)
    for weights in recorder.after_step:
        bf16_ema = bf16_ema.lerp(weights[name].to(torch.bfloat16), 1e-3)
    assert (bf16_ema.double() != init)[below].float().mean().item() < 0.01
    exact = load_file(str(tmp_path / "checkpoint-6" / "ema" / "ema_state.safetensors"))
    assert exact[name].dtype == torch.float32 and torch.equal(exact[name], ema)


def test_resume_is_bit_identical(tmp_path, tokenizer, lm_data):
    cfg = EMAConfig(decay=0.9)

    def model():
        return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)

    full = tmp_path / "full"
    run(full, model(), lm_data[0], tokenizer, cfg, max_steps=20, save_steps=10)
    # The resumed run lives in another folder and resumes from an explicit path.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-10", tmp_path / "saved-checkpoint-10")
    _, callback, _ = run(
        resumed,
        model(),
        lm_data[0],
        tokenizer,
        cfg,
        resume=str(tmp_path / "saved-checkpoint-10"),
        max_steps=20,
        save_steps=10,
    )
    assert callback.ema.step == 20 and callback.ema.num_updates == 20
    a = load_file(str(full / "ema" / "model.safetensors"))
    b = load_file(str(resumed / "ema" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _ema_tensors(folder):
    return load_file(
        str(
            folder / "ema_state.safetensors"
            if (folder / "ema_state.safetensors").is_file()
            else folder / "model.safetensors"
        )
    )


def test_resume_skips_a_checkpoint_whose_ema_is_incomplete(tmp_path, tokenizer, lm_data, caplog):
    """A crash between the Trainer's checkpoint and its `ema/`: `resume_from_checkpoint=True` resumes from the newest
    checkpoint whose weights and EMA are both complete, and the run ends with the uninterrupted run's EMA."""
    cfg = EMAConfig(decay=0.9)

    def model():
        return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)

    class StopAt(TrainerCallback):  # the same 6-step run (same LR schedule), stopped after step 4 as by a crash
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    run(tmp_path / "whole", model(), lm_data[0], tokenizer, cfg, max_steps=6, save_steps=2)
    cut = Trainer(
        model=model(),
        args=make_args(tmp_path / "cut", max_steps=6, save_steps=2),
        train_dataset=lm_data[0],
        processing_class=tokenizer,
        callbacks=[EMACallback(cfg, save_final=False), StopAt()],
    )
    cut.train()
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4" / "ema")  # as if killed before `ema/` was renamed into place
    (tmp_path / "cut" / "checkpoint-4" / ".ema.tmp-deadbeef").mkdir()  # what the killed write left
    with caplog.at_level(logging.WARNING, logger="hf_ema.trainer.callback"):
        trainer, callback, _ = run(
            tmp_path / "cut", model(), lm_data[0], tokenizer, cfg, resume=True, max_steps=6, save_steps=2
        )
    assert any("has no complete EMA" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    assert callback.ema.num_updates == 6  # not restarted: 6 updates, as in the uninterrupted run
    for step in (4, 6):
        whole = _ema_tensors(tmp_path / "whole" / f"checkpoint-{step}" / "ema")
        resumed = _ema_tensors(tmp_path / "cut" / f"checkpoint-{step}" / "ema")
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (step, name)
    assert not list((tmp_path / "cut" / "checkpoint-4").glob(".ema.tmp-*"))  # removed by the next save


def test_resume_without_any_complete_ema_stops_before_training(tmp_path, tokenizer, lm_data, caplog):
    cfg = EMAConfig(decay=0.9)
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    run(tmp_path, model, lm_data[0], tokenizer, cfg, max_steps=4, save_steps=2)
    for step in (2, 4):
        shutil.rmtree(tmp_path / f"checkpoint-{step}" / "ema")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 has no complete `ema/`.*none is left.*allow_ema_restart"):
        run(tmp_path, model, lm_data[0], tokenizer, cfg, resume=True, max_steps=6, save_steps=2)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing trained or written
    # An explicit path to a checkpoint without EMA stops too, naming the complete ones (none here).
    with pytest.raises(CheckpointError, match="checkpoint-2 has no complete"):
        run(tmp_path, model, lm_data[0], tokenizer, cfg, resume=str(tmp_path / "checkpoint-2"), max_steps=6)

    # The explicit way on: restart the EMA from the resumed weights, with a warning.
    callback = EMACallback(cfg, allow_ema_restart=True)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=6, save_steps=2),
        train_dataset=lm_data[0],
        callbacks=[callback],
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_ema.trainer.callback"):
        trainer.train(resume_from_checkpoint=True)
    # Said once, on one line, naming the checkpoint (it used to be said twice, worded differently).
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_ema.trainer.callback"]
    assert len(warnings) == 1, warnings
    assert "restarts from the resumed weights (allow_ema_restart=True)" in warnings[0]
    assert "checkpoint-4" in warnings[0] and "\n" not in warnings[0]
    assert callback.ema.step == 6 and callback.ema.num_updates == 2


def test_bad_configuration_fails_before_training(tmp_path, tiny_model, lm_data, tokenizer):
    with pytest.raises(ConfigError, match=r"`decay` must be in \[0, 1\), got 1.5"):
        EMACallback(decay=1.5)
    with pytest.raises(ConfigError, match="`include` pattern 'not_a_layer' matches no tensor"):
        Trainer(
            model=tiny_model,
            args=make_args(tmp_path),
            train_dataset=lm_data[0],
            callbacks=[EMACallback(include=["not_a_layer"])],
        )
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("metric", ["eval_ema_loss", "ema_loss"])
def test_ema_best_metric_without_ema_evaluation_fails_when_bound(tmp_path, tiny_model, lm_data, metric):
    """`metric_for_best_model="eval_ema_loss"` with `EMACallback(eval_ema=False)`: one line naming both, raised when
    the callback is bound (at `Trainer(...)`, at `bind`, or at `train()` for `add_callback`), before step 1 (the
    Trainer itself would stop at its first evaluation with a `KeyError`)."""
    args = make_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        metric_for_best_model=metric,
        load_best_model_at_end=True,
    )
    common = dict(model=tiny_model, args=args, train_dataset=lm_data[0], eval_dataset=lm_data[1].select(range(8)))
    expected = rf"^`metric_for_best_model` is '{metric}', which only the EMA evaluation logs, but the callback was built with `eval_ema=False`: pass `EMACallback\(eval_ema=True\)`"

    with pytest.raises(ConfigError, match=expected) as err:
        Trainer(**common, callbacks=[EMACallback(decay=0.9, eval_ema=False)])
    assert "\n" not in str(err.value)

    trainer = Trainer(**common)
    with pytest.raises(ConfigError, match=expected):
        EMACallback(decay=0.9, eval_ema=False).bind(trainer)

    trainer.add_callback(EMACallback(decay=0.9, eval_ema=False))
    with pytest.raises(ConfigError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written

    # With the EMA evaluation on (the default), the same arguments are fine.
    Trainer(**common, callbacks=[EMACallback(decay=0.9)])


def test_callback_added_after_init_binds_at_train_begin(tmp_path, tokenizer, lm_data):
    """`trainer.add_callback(EMACallback(...))` after `Trainer(...)`: the EMA evaluation runs, and a resume from a
    checkpoint at another path restores the EMA from that path."""

    def trainer_with_added_callback(out, max_steps):
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
        args = make_args(
            out, max_steps=max_steps, save_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8
        )
        trainer = Trainer(model=model, args=args, train_dataset=lm_data[0], eval_dataset=lm_data[1].select(range(8)))
        callback = EMACallback(decay=0.9)
        trainer.add_callback(callback)
        return trainer, callback

    trainer, callback = trainer_with_added_callback(tmp_path / "first", max_steps=2)
    trainer.train()
    assert callback.trainer is trainer
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evals and all("eval_ema_loss" in e for e in evals)
    assert evals[-1]["eval_ema_loss"] != evals[-1]["eval_loss"]

    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-2")
    trainer, callback = trainer_with_added_callback(tmp_path / "second", max_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "elsewhere" / "checkpoint-2"))
    assert callback.ema.step == 4 and callback.ema.num_updates == 4  # 2 restored + 2 new, not a restart


# What the subprocess of `test_hf_ema_never_imports_deepspeed` runs: a custom-loop EMA saved and loaded, then a Trainer
# run with EMACallback; every time the `deepspeed` package is executed, the call stack is recorded.
_DEEPSPEED_PROBE = r"""
import importlib.abc, importlib.machinery, json, sys, traceback

stacks = []


class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "deepspeed":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and not hasattr(spec.loader, "probed"):
            run = spec.loader.exec_module

            def traced(module):  # the import itself, not a mere `importlib.util.find_spec("deepspeed")`
                stacks.append([frame.filename for frame in traceback.extract_stack()[:-1]])
                run(module)

            spec.loader.exec_module, spec.loader.probed = traced, True
        return spec


sys.meta_path.insert(0, Probe())

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_ema
from hf_ema import EMACallback, ModelEMA

out = sys.argv[1]
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
model = LlamaForCausalLM(config)
ema = ModelEMA(model, decay=0.9)
ema.update()
hf_ema.save_ema(ema, out + "/loop-ema")
hf_ema.load_ema(ModelEMA(LlamaForCausalLM(config), decay=0.9), out + "/loop-ema")

data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(8)]
args = TrainingArguments(out + "/run", max_steps=2, save_steps=2, eval_strategy="steps", eval_steps=2,
                         report_to=[], use_cpu=True, disable_tqdm=True, metric_for_best_model="eval_ema_loss")
Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[EMACallback(decay=0.9)]).train()
print(json.dumps(stacks))
"""


def test_hf_ema_never_imports_deepspeed(tmp_path):
    """DeepSpeed, once imported on a machine without a GPU, logs `[real_accelerator.py] Setting accelerator to CPU`.
    hf-ema never imports it (`hf_ema/compat/deepspeed.py` only reads the attributes of ZeRO-3 parameters). When it is
    installed, upstream code imports it in every run: accelerate's `extract_model_from_parallel`, which transformers
    calls in `Trainer.__init__` and in every `save_pretrained`. So the line is the environment's (the `dev` extra
    installs DeepSpeed for the ZeRO-3 tests; the `serve` and `demo` extras do not), and this test checks that no
    import of `deepspeed` in a custom-loop EMA or a Trainer run with `EMACallback` is made by hf-ema itself."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    import hf_ema

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (the `test` extra installs it on Linux)")
    proc = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stacks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stacks, "DeepSpeed is installed but was never imported: the upstream paths named above changed"
    package = Path(hf_ema.__file__).resolve().parent
    for stack in stacks:
        importer = next(f for f in reversed(stack) if not f.startswith("<frozen"))
        assert not Path(importer).resolve().is_relative_to(package), stack
        assert "site-packages" in importer, stack  # an upstream library (accelerate), not hf-ema

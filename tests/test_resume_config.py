"""A resume whose `EMAConfig` changes the average: without `allow_config_change` it stops before the next step with
one line naming each changed field, old and new, and the opt-in; with it, the EMA goes on as documented (the new
schedule from the resume step, newly averaged tensors from the current weights, dropped ones gone, a new dtype cast),
checked against a float64 reference written from the formulas here."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_model_ema import Net  # fc1, bn (float running stats, an int batch counter), fc2
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_ema import ConfigMismatchError, ModelEMA, load_ema, save_ema

#: Steps before the save, and the last step after the resume.
SAVED, LAST = 3, 6


def weights_at(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """The weights of every step, fixed by a seed: each float tensor random, the batch counter the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        name: torch.randn(t.shape, generator=gen) if t.is_floating_point() else torch.full(t.shape, step)
        for name, t in model.state_dict().items()
    }


@torch.no_grad()
def set_weights(model: nn.Module, step: int) -> None:
    for name, value in weights_at(model, step).items():
        model.state_dict()[name].copy_(value)


def saved_ema(tmp_path, model, **old):
    """An EMA of `model` with the old settings, updated at steps 1..SAVED and saved; the model then holds the weights
    of step SAVED (the weights a resume starts from)."""
    set_weights(model, 0)
    ema = ModelEMA(model, **old)
    for step in range(1, SAVED + 1):
        set_weights(model, step)
        ema.update(step=step)
    save_ema(ema, tmp_path / "ema")
    return ema


def reference(model, names, start, schedule, first_step, last_step=LAST):
    """float64 EMA of the recorded weights: from `start` (name -> value), `ema = b * ema + (1 - b) * w_s` at each step
    `s` from `first_step` to `last_step` whose `schedule(s)` is a decay (None: no update that step)."""
    ema = {n: start[n].double() for n in names}
    for step in range(first_step, last_step + 1):
        beta = schedule(step)
        if beta is None:
            continue
        w = weights_at(model, step)
        ema = {n: beta * ema[n] + (1 - beta) * w[n].double() for n in names}
    return ema


def decay_every(beta, k=1):
    return lambda step: beta**k if step % k == 0 else None


def resumed(model, tmp_path, **new):
    """A new EMA with the new settings, loaded with the opt-in, then updated at steps SAVED+1..LAST."""
    ema = ModelEMA(model, **new)
    load_ema(ema, tmp_path / "ema", allow_config_change=True)
    for step in range(SAVED + 1, LAST + 1):
        set_weights(model, step)
        ema.update(step=step)
    return ema


def assert_close(ema: ModelEMA, expected: dict[str, torch.Tensor], atol=1e-6):
    got = {t.name: t.ema for t in ema.named_tensors() if t.averaged}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert (got[name].double() - value).abs().max().item() <= atol, name


PARAMS = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
STATS = ["bn.running_mean", "bn.running_var"]

#: id -> (old settings, new settings, the changed fields as the error names them).
CASES = {
    "decay": (dict(decay=0.9), dict(decay=0.6), ["decay 0.9 -> 0.6"]),
    "half_life": (dict(half_life=4.0), dict(half_life=2.0), ["half_life 4.0 -> 2.0"]),
    "update_every": (dict(decay=0.8), dict(decay=0.8, update_every=2), ["update_every 1 -> 2"]),
    "dtype": (dict(decay=0.8), dict(decay=0.8, dtype="bfloat16"), ["dtype 'float32' -> 'bfloat16'"]),
    "include_buffers": (dict(decay=0.8), dict(decay=0.8, include_buffers=False), ["include_buffers True -> False"]),
    "added_exclude": (dict(decay=0.8), dict(decay=0.8, exclude=["fc2"]), ["exclude None -> ['fc2']"]),
    "removed_exclude": (dict(decay=0.8, exclude=["fc2"]), dict(decay=0.8), ["exclude ['fc2'] -> None"]),
    "other_include": (
        dict(decay=0.8, include=["fc1"]),
        dict(decay=0.8, include=["fc2"]),
        ["include ['fc1'] -> ['fc2']"],
    ),
    "two_fields": (dict(decay=0.9), dict(decay=0.6, update_every=3), ["decay 0.9 -> 0.6", "update_every 1 -> 3"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_changed_setting_stops_the_resume_in_one_line(tmp_path, case):
    old, new, fields = CASES[case]
    model = Net()
    saved_ema(tmp_path, model, **old)
    ema = ModelEMA(model, **new)
    before = {t.name: t.ema.clone() for t in ema.named_tensors()}
    with pytest.raises(ConfigMismatchError) as info:
        load_ema(ema, tmp_path / "ema")
    message = str(info.value)
    assert "\n" not in message
    for field in fields:
        assert field in message, (field, message)
    assert f"`{tmp_path / 'ema'}`" in message and "allow_config_change=True" in message
    assert "EMACallback(allow_config_change=True)" in message and f"from step {SAVED}" in message
    # Nothing was loaded: the EMA is the one built from the current weights, at step 0.
    assert ema.step == 0 and ema.num_updates == 0
    assert all(torch.equal(before[t.name], t.ema) for t in ema.named_tensors())


def _old_reference(model, names, old_beta):
    return reference(model, names, weights_at(model, 0), decay_every(old_beta), 1, SAVED)


@pytest.mark.parametrize(
    "case, old_beta, new_schedule",
    [
        ("decay", 0.9, decay_every(0.6)),
        ("half_life", 0.5 ** (1 / 4), decay_every(0.5 ** (1 / 2))),
        # `update_every` counts from the EMA's start: with 2, the updates after the resume are at steps 4 and 6.
        ("update_every", 0.8, decay_every(0.8, k=2)),
    ],
)
def test_new_schedule_applies_from_the_resume_step(tmp_path, case, old_beta, new_schedule):
    old, new, _ = CASES[case]
    model = Net()
    saved_ema(tmp_path, model, **old)
    ema = resumed(model, tmp_path, **new)
    names = PARAMS + STATS
    at_save = _old_reference(model, names, old_beta)
    assert_close(ema, reference(model, names, at_save, new_schedule, SAVED + 1))
    assert ema.step == LAST and ema.num_updates == SAVED + sum(new_schedule(s) is not None for s in range(4, 7))
    # The config history: the saved settings from step 0, the new ones from the resume step.
    save_ema(ema, tmp_path / "after")
    history = json.loads((tmp_path / "after" / "ema_state.json").read_text())["config_history"]
    assert [entry["step"] for entry in history] == [0, SAVED]
    for key, value in old.items():
        assert history[0]["config"][key] == value
    for key, value in new.items():
        assert history[1]["config"][key] == value


def test_new_dtype_casts_the_saved_ema(tmp_path):
    old, new, _ = CASES["dtype"]
    model = Net()
    saved = saved_ema(tmp_path, model, **old)
    ema = ModelEMA(model, **new)
    load_ema(ema, tmp_path / "ema", allow_config_change=True)
    saved_values = {t.name: t.ema for t in saved.named_tensors()}
    for t in ema.named_tensors():
        if t.averaged:
            assert t.ema.dtype == torch.bfloat16
            assert torch.equal(t.ema, saved_values[t.name].to(torch.bfloat16)), t.name
    for step in range(SAVED + 1, LAST + 1):
        set_weights(model, step)
        ema.update(step=step)
    names = PARAMS + STATS
    expected = reference(model, names, _old_reference(model, names, 0.8), decay_every(0.8), SAVED + 1)
    assert_close(ema, expected, atol=2e-2)  # bf16 rounding of every update


@pytest.mark.parametrize(
    "case, kept, new_names, dropped",
    [
        ("include_buffers", PARAMS, [], STATS),
        ("added_exclude", ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias"] + STATS, [], ["fc2.bias", "fc2.weight"]),
        (
            "removed_exclude",
            ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias"] + STATS,
            ["fc2.bias", "fc2.weight"],
            [],
        ),
        ("other_include", [], ["fc2.bias", "fc2.weight"], ["fc1.bias", "fc1.weight"]),
    ],
)
def test_changed_selection(tmp_path, caplog, case, kept, new_names, dropped):
    """Kept tensors go on from the saved EMA, new ones start from the weights of the resume step (with a warning
    naming them), dropped ones leave the EMA."""
    old, new, _ = CASES[case]
    model = Net()
    saved_ema(tmp_path, model, **old)
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        ema = resumed(model, tmp_path, **new)
    at_save = _old_reference(model, kept, 0.8)
    at_save.update({n: weights_at(model, SAVED)[n].double() for n in new_names})
    assert_close(ema, reference(model, kept + new_names, at_save, decay_every(0.8), SAVED + 1))
    messages = " ".join(r.getMessage() for r in caplog.records)
    if new_names:
        assert f"start from the current weights at step {SAVED}: {', '.join(new_names)}" in messages
    if dropped:
        assert f"leave the EMA (no longer selected): {', '.join(dropped)}" in messages


def test_settings_that_keep_the_average_may_change(tmp_path):
    """Where and how the EMA runs (`device`, `async_update`, `cuda_stream`, `shard_across_ranks`) and the NaN policy
    do not change its average; a selection written differently that selects the same tensors neither."""
    model = Net()
    saved = saved_ema(tmp_path, model, decay=0.8)
    ema = ModelEMA(
        model,
        decay=0.8,
        device="cpu",
        async_update=True,
        cuda_stream=True,
        shard_across_ranks=False,
        on_nonfinite="raise",
        include=[".*"],
        trainable_only=False,
    )
    load_ema(ema, tmp_path / "ema")
    ema.wait()
    assert all(torch.equal(a.ema, b.ema) for a, b in zip(ema.named_tensors(), saved.named_tensors()))
    assert [entry["step"] for entry in ema.config_history] == [0, SAVED]  # recorded, though not a change of math
    ema.close()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("direction", ["lora_to_full", "full_to_lora"])
def test_lora_and_full(tmp_path, tokenizer, caplog, direction):
    """A PEFT model: the EMA of the adapter only (`trainable_only` None, the default) and of every weight
    (`trainable_only=False`). Going to full, the base weights start from the current weights; going back, they
    leave the EMA; the adapter goes on from the saved EMA either way."""
    from peft import LoraConfig, get_peft_model

    from hf_ema.demo.toy import tiny_causal_lm

    base = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    old, new = ({}, {"trainable_only": False}) if direction == "lora_to_full" else ({"trainable_only": False}, {})
    ema_old = ModelEMA(model, decay=0.5, **old)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    ema_old.update(step=1)
    save_ema(ema_old, tmp_path / "ema")
    saved = {t.name: t.ema.clone() for t in ema_old.named_tensors()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # the weights at the resume
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ModelEMA(model, decay=0.5, **new)
    with pytest.raises(ConfigMismatchError, match=r"trainable_only (None -> False|False -> None)"):
        load_ema(ema, tmp_path / "ema")
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        load_ema(ema, tmp_path / "ema", allow_config_change=True)
    got = {t.name: t.ema for t in ema.named_tensors()}
    adapter = {n for n in got if "lora_" in n}
    assert adapter and all(torch.equal(got[n], saved[n]) for n in adapter)
    if direction == "lora_to_full":
        base_names = set(got) - adapter
        assert base_names and all(torch.equal(got[n], current[n].float()) for n in base_names)
        assert any("start from the current weights" in r.getMessage() for r in caplog.records)
    else:
        assert set(got) == adapter and len(saved) > len(adapter)
        assert any("leave the EMA" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- the Trainer
class _Steps(TrainerCallback):
    """The optimizer steps a run made, and the weights after each (float64)."""

    def __init__(self):
        self.steps, self.weights = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)
        self.weights.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def _train(out, tokenizer, lm_data, callback, resume=None):
    from _trainer_args import cpu_args

    from hf_ema.demo.toy import tiny_causal_lm

    steps = _Steps()
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    args = cpu_args(out, max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=5e-3)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data[0], callbacks=[callback, steps])
    trainer.train(resume_from_checkpoint=resume)
    return steps


def _tree(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.trainer
@pytest.mark.parametrize("change", ["decay", "added_exclude"])
def test_trainer_resume_with_changed_settings(tmp_path, tokenizer, lm_data, change):
    """Through a real Trainer: the resume from checkpoint-2 with another decay (or an added exclude) stops before step
    3 in one line, writing nothing; with `EMACallback(allow_config_change=True)` the run ends with the saved EMA of
    step 2 folded with the new settings at steps 3 and 4 (an excluded tensor: the raw weights, as `ema/` holds for
    every tensor the EMA does not average), and `ema_state.json` records both configs."""
    from safetensors.torch import load_file

    from hf_ema import EMACallback

    new = {"decay": dict(decay=0.6), "added_exclude": dict(decay=0.9, exclude=["embed_tokens"])}[change]
    field = {"decay": "decay 0.9 -> 0.6", "added_exclude": "exclude None -> ['embed_tokens']"}[change]
    _train(tmp_path, tokenizer, lm_data, EMACallback(decay=0.9))
    checkpoint = tmp_path / "checkpoint-2"
    before = _tree(tmp_path)
    steps = _Steps()
    with pytest.raises(ConfigMismatchError) as info:
        steps = _train(tmp_path, tokenizer, lm_data, EMACallback(**new), resume=str(checkpoint))
    assert "\n" not in str(info.value) and field in str(info.value)
    assert "EMACallback(allow_config_change=True)" in str(info.value)
    assert steps.steps == [] and _tree(tmp_path) == before  # stopped before step 3, nothing written

    steps = _train(tmp_path, tokenizer, lm_data, EMACallback(**new, allow_config_change=True), resume=str(checkpoint))
    assert steps.steps == [3, 4]
    saved = load_file(str(checkpoint / "ema" / "model.safetensors"))  # an fp32 model: the weights hold it exactly
    final = load_file(str(tmp_path / "ema" / "model.safetensors"))
    beta = new["decay"]
    for name, value in final.items():
        if name == "model.embed_tokens.weight" and change == "added_exclude":
            assert torch.equal(value.double(), steps.weights[-1][name])  # no longer averaged: the raw weights
            continue
        expected = saved[name].double()
        for weights in steps.weights:
            expected = beta * expected + (1 - beta) * weights[name]
        assert (value.double() - expected).abs().max().item() <= 1e-6, name
    history = json.loads((tmp_path / "ema" / "ema_state.json").read_text())["config_history"]
    assert [(h["step"], h["config"]["decay"], h["config"]["exclude"]) for h in history] == [
        (0, 0.9, None),
        (2, beta, new.get("exclude")),
    ]

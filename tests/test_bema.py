"""BEMA (bias-corrected EMA, Block & Zhang 2025): hf-ema's BEMA weights against two independent references computed
here from the same trajectory of weights (trl's `BEMACallback` update rule, and the paper's formulas in float64),
its `ema/` folder (loadable, exact resume), and its cost in memory.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hf_ema import (
    BEMAConfig,
    CheckpointError,
    ConfigError,
    EMAConfig,
    ModelEMA,
    load_ema,
    read_ema_state,
    save_ema,
    write_plain_ema,
)
from hf_ema.demo.toy import tiny_causal_lm
from hf_ema.tools.model_card import ema_card_text

DIST = Path(__file__).resolve().parent / "dist"


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 48).to(dtype)
        self.b = nn.Linear(48, 8).to(dtype)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def trajectory(model: nn.Module, steps: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """`steps` perturbations of the weights (as an optimizer would make them), by step and parameter name."""
    g = torch.Generator().manual_seed(seed)
    deltas = {
        s: {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in model.named_parameters()}
        for s in range(1, steps + 1)
    }
    return deltas


def run(model: nn.Module, ema: ModelEMA, deltas, steps: range) -> dict[int, dict[str, torch.Tensor]]:
    """Apply the deltas of `steps` and update the EMA after each; the weights of each step, in float64."""
    params = dict(model.named_parameters())
    seen = {}
    for s in steps:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(deltas[s][n].to(p.dtype))
            if hasattr(model, "count"):
                model.count += 1
        ema.update(step=s)
        seen[s] = {n: p.detach().double().clone() for n, p in params.items()}
    return seen


def paper_bema(theta: dict[int, dict[str, torch.Tensor]], last: int, cfg: BEMAConfig, update_every: int = 1):
    """The paper's Algorithm 1 in float64: `theta_0` and the EMA start at `theta_tau`; after it, every
    `update_every` steps `ema = b * ema + (1 - b) * theta_t` with `b = (1 - w_t) ** update_every`,
    `w_t = max((rho + gamma t) ** -kappa, w_min)`, `t` counted from `tau`; BEMA at `last` is
    `ema + alpha_t (theta_last - theta_0)`, `alpha_t = (rho + gamma t) ** -eta`."""
    theta0 = theta[cfg.tau]
    ema = dict(theta0)
    for s in range(cfg.tau + 1, last + 1):
        t = s - cfg.tau
        if t % update_every:
            continue
        w = max((cfg.rho + cfg.gamma * t) ** (-cfg.kappa), cfg.min_weight)
        b = (1 - w) ** update_every
        ema = {n: b * ema[n] + (1 - b) * theta[s][n] for n in ema}
    alpha = (cfg.rho + cfg.gamma * (last - cfg.tau)) ** (-cfg.eta)
    return {n: ema[n] + alpha * (theta[last][n] - theta0[n]) for n in ema}


def trl_bema(theta: dict[int, dict[str, torch.Tensor]], last: int, update_after: int, **kw) -> dict[str, torch.Tensor]:
    """trl's `BEMACallback` update rule with `update_freq=1`, transcribed: fp32 buffers; before `update_after`
    nothing, at `update_after` `theta_0 = ema = theta` (at train begin for 0), after it at every step (the global
    step `s`) `beta = max((lag + multiplier s) ** -ema_power, min_ema_multiplier)`, `ema = ema (1 - beta) + beta
    theta`, `bema = ema + (lag + multiplier s) ** -bias_power (theta - theta_0)`."""
    lag, mult, ema_power, bias_power = kw["lag"], kw["multiplier"], kw["ema_power"], kw["bias_power"]
    theta0 = {n: v.float() for n, v in theta[update_after].items()}
    ema = {n: v.clone() for n, v in theta0.items()}
    bema = dict(ema)
    for s in range(update_after + 1, last + 1):
        beta = max((lag + mult * s) ** (-ema_power), kw["min_ema_multiplier"])
        alpha = (lag + mult * s) ** (-bias_power)
        for n in ema:
            x = theta[s][n].float()
            ema[n].mul_(1 - beta).add_(x, alpha=beta)
            bema[n] = ema[n] + alpha * (x - theta0[n])
    return bema


def bema_of(ema: ModelEMA) -> dict[str, torch.Tensor]:
    state = ema.full_state_dict(dtype="ema")
    return {n: state[n] for n in ema.names}


# ---------------------------------------------------------------------------------------------------- config
def test_bema_config():
    cfg = EMAConfig(bema=True)
    assert cfg.bema_config == BEMAConfig(eta=0.2, kappa=0.5, rho=10.0, gamma=1.0, tau=0, min_weight=0.0)
    assert EMAConfig(bema={"tau": 5}).start_step == 5  # the burn-in is the EMA's start
    assert EMAConfig.from_dict(EMAConfig(bema={"eta": 0.3}).to_dict()).bema_config.eta == 0.3
    # The EMA's decay is 1 - w_t over each update's interval.
    assert math.isclose(EMAConfig(bema=True, update_every=2).decay_at(4), (1 - 14**-0.5) ** 2)
    for bad in ({"decay": 0.9}, {"half_life": 10}, {"sigma_rel": 0.1}, {"warmup": True}, {"start_step": 3}):
        with pytest.raises(ConfigError, match="`bema` sets its own schedule"):
            EMAConfig(bema=True, **bad)
    with pytest.raises(ConfigError, match=r"`bema.rho` must be > 0, got 0"):
        BEMAConfig(rho=0)
    with pytest.raises(ConfigError, match=r"`bema.min_weight` must be in \[0, 1\], got 2"):
        BEMAConfig(min_weight=2)
    with pytest.raises(TypeError, match="`bema` has unknown fields"):
        EMAConfig(bema={"lag": 3})
    # trl's names; its global-step schedule at update_after = 7 is hf-ema's with the lag shifted by 7.
    trl = BEMAConfig.from_trl(bias_power=0.3, ema_power=0.6, lag=4, multiplier=2.0, update_after=7)
    assert trl == BEMAConfig(eta=0.3, kappa=0.6, rho=18.0, gamma=2.0, tau=7, min_weight=0.0)


# ---------------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tau", [0, 3])
@pytest.mark.parametrize("update_every", [1, 2])
@pytest.mark.parametrize("min_weight", [0.0, 0.2])
def test_bema_equals_the_paper_in_float64(dtype, tau, update_every, min_weight):
    model = Net(dtype)
    cfg = BEMAConfig(tau=tau, min_weight=min_weight)
    ema = ModelEMA(model, bema=cfg, update_every=update_every)
    theta = {0: {n: p.detach().double().clone() for n, p in model.named_parameters()}}
    theta.update(run(model, ema, trajectory(model, 12), range(1, 13)))
    # Read at step 12, also where the last update was step 11: the EMA of the last update, corrected with the
    # weights and alpha of the step it is read at.
    want = paper_bema(theta, 12, cfg, update_every)
    got = bema_of(ema)
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("update_after", [0, 4])
def test_bema_equals_trl_bema_callback(update_after):
    model = Net(torch.float32)
    trl_args = {"bias_power": 0.2, "ema_power": 0.5, "lag": 10, "multiplier": 1.0, "min_ema_multiplier": 0.0}
    ema = ModelEMA(model, bema=BEMAConfig.from_trl(update_after=update_after, **trl_args))
    theta = {0: {n: p.detach().double().clone() for n, p in model.named_parameters()}}
    theta.update(run(model, ema, trajectory(model, 10), range(1, 11)))
    want = trl_bema(theta, 10, update_after, **trl_args)
    got = bema_of(ema)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_bema_swapped_and_copy_to_hold_the_corrected_weights():
    model = Net()
    ema = ModelEMA(model, bema={"tau": 2})
    theta = {0: {n: p.detach().double().clone() for n, p in model.named_parameters()}}
    theta.update(run(model, ema, trajectory(model, 6), range(1, 7)))
    want = paper_bema(theta, 6, ema.config.bema_config)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped() as m:
        for name, p in m.named_parameters():
            torch.testing.assert_close(p.double(), want[name], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())  # the raw weights are back
    other = Net()
    ema.copy_to(other)
    for name, p in other.named_parameters():
        torch.testing.assert_close(p.double(), want[name], rtol=1e-6, atol=1e-6)
    # The plain EMA is untouched by forming BEMA's weights.
    plain = ema.state_dict()["tensors"]
    assert not torch.allclose(plain["a.weight"].double(), want["a.weight"])


def test_bema_during_the_burn_in_is_the_copied_weights():
    model = Net()
    ema = ModelEMA(model, bema={"tau": 5})
    run(model, ema, trajectory(model, 3), range(1, 4))
    got = bema_of(ema)
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.detach())
    assert not ema.bias_correction.ready and "bema_theta0" not in ema.state_dict()


# ---------------------------------------------------------------------------------------------------- ema/ folder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bema_folder_loads_with_from_pretrained_and_resumes_bit_exact(tmp_path, tokenizer, dtype):
    from transformers import AutoModelForCausalLM

    def build():
        return tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).to(dtype)

    model = build()
    ema = ModelEMA(model, bema={"tau": 1}, update_every=2)
    deltas = trajectory(model, 8)
    run(model, ema, deltas, range(1, 6))
    save_ema(ema, tmp_path / "at5")
    at5 = {k: v.clone() for k, v in model.state_dict().items()}
    run(model, ema, deltas, range(6, 9))
    save_ema(ema, tmp_path / "uninterrupted")

    # The weights `from_pretrained` loads are BEMA's, in the model's dtype; the exact file holds the plain EMA and
    # theta_0 (in the weights' dtype: 2 bytes a parameter for bf16).
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uninterrupted")
    corrected = ema.full_state_dict(dtype="model")
    for name, p in loaded.named_parameters():
        assert p.dtype == dtype and torch.equal(p.detach(), corrected[name]), name
    exact = load_file(str(tmp_path / "uninterrupted" / "ema_state.safetensors"))
    plain = ema.state_dict()
    for name in ema.names:
        assert torch.equal(exact[name], plain["tensors"][name])
        assert torch.equal(exact[f"bema_theta0.{name}"], plain["bema_theta0"][name])
        assert exact[f"bema_theta0.{name}"].dtype == dtype
    meta = read_ema_state(tmp_path / "uninterrupted")
    assert meta["config"]["bema"]["tau"] == 1 and set(meta["bema_theta0"]) == set(ema.names)
    # The plain EMA underneath, as a folder of its own (the app's `ema-plain` pane).
    plain_dir = write_plain_ema(tmp_path / "uninterrupted", tmp_path / "plain")
    plain_model = dict(AutoModelForCausalLM.from_pretrained(plain_dir).named_parameters())
    for name in ema.names:
        assert torch.equal(plain_model[name].detach(), plain["tensors"][name].to(dtype)), name
    save_ema(ModelEMA(build(), decay=0.9), tmp_path / "not_bema")
    with pytest.raises(CheckpointError, match="not a BEMA `ema/` folder"):
        write_plain_ema(tmp_path / "not_bema", tmp_path / "plain2")
    # The Hub card says what the weights are.
    card = ema_card_text(tmp_path / "uninterrupted", repo_id="user/bema")
    assert "bias-corrected exponential moving average (BEMA" in card
    assert "| EMA horizon | BEMA, bias-corrected EMA (Block & Zhang 2025; eta=0.2, kappa=0.5, rho=10.0" in card

    resumed_model = build()
    resumed_model.load_state_dict(at5)
    resumed = ModelEMA(resumed_model, bema={"tau": 1}, update_every=2)
    load_ema(resumed, tmp_path / "at5")
    run(resumed_model, resumed, deltas, range(6, 9))
    save_ema(resumed, tmp_path / "resumed")
    for file in ("model.safetensors", "ema_state.safetensors"):
        assert (tmp_path / "resumed" / file).read_bytes() == (tmp_path / "uninterrupted" / file).read_bytes()
    a, b = (json.loads((tmp_path / f / "ema_state.json").read_text()) for f in ("resumed", "uninterrupted"))
    assert a == b


def test_bema_adds_one_weight_dtype_copy(tokenizer):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0).to(torch.bfloat16)
    plain, bema = ModelEMA(model, decay=0.9), ModelEMA(model, bema=True)
    averaged = sum(t.live.numel() for t in plain.named_tensors(include_copied=False))
    assert bema.num_bytes() - plain.num_bytes() == 2 * averaged  # theta_0 in bf16


@pytest.mark.multiprocess
def test_bema_resume_at_other_world_sizes_is_bit_exact(tmp_path):
    # Two ranks train with BEMA (FSDP2 and the DDP-sharded EMA), save mid-run and at the end; one and four ranks
    # resume the mid-run folder, replay the same weights, and end with the same folder, byte for byte.
    sys.path.insert(0, str(DIST))
    from launch import torchrun

    modes = "fsdp2,ddp"
    torchrun("bema_worker.py", "train", str(tmp_path), modes)
    for nproc in (1, 4):
        torchrun("bema_worker.py", "resume", str(tmp_path), modes, nproc=nproc)
    for mode in modes.split(","):
        first = tmp_path / mode / "final"
        for nproc in (1, 4):
            again = tmp_path / mode / f"resumed{nproc}"
            for file in ("model.safetensors", "ema_state.safetensors"):
                assert (again / file).read_bytes() == (first / file).read_bytes(), (mode, nproc, file)
            a, b = (read_ema_state(f) for f in (first, again))
            assert b["world_size"] == nproc and a["tensors"] == b["tensors"] and a["bema_theta0"] == b["bema_theta0"]
            for key in ("step", "num_updates", "decay", "config"):
                assert a[key] == b[key], (mode, key)


# ---------------------------------------------------------------------------------------------------- Trainer
def recorded_theta(recorder) -> dict[int, dict[str, torch.Tensor]]:
    return {0: recorder.initial, **dict(enumerate(recorder.after_step, start=1))}


@pytest.mark.trainer
def test_bema_trainer_checkpoints_and_eval_are_bema(tmp_path, tiny_model, tokenizer, lm_data):
    from test_callback import RecordWeights, make_args
    from test_evaluation import _eval_loss_of
    from transformers import AutoModelForCausalLM, Trainer

    from hf_ema import EMACallback

    train_ds, eval_ds = lm_data
    eval_ds = eval_ds.select(range(32))
    cfg = EMAConfig(bema={"tau": 2})
    recorder = RecordWeights()
    args = make_args(tmp_path / "run", eval_strategy="steps", eval_steps=2, save_steps=2, learning_rate=2e-2)
    trainer = Trainer(
        model=tiny_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=[EMACallback(cfg), recorder],
    )  # fmt: skip
    trainer.train()
    theta = recorded_theta(recorder)
    evals = [e for e in trainer.state.log_history if "eval_ema_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    for entry in evals:
        folder = tmp_path / "run" / f"checkpoint-{entry['step']}" / "ema"
        loaded = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
        want = paper_bema(theta, entry["step"], cfg.bema_config)
        for name, value in want.items():
            torch.testing.assert_close(loaded[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
        # The EMA metrics are BEMA's: the saved BEMA weights evaluated alone give the same loss.
        ref = _eval_loss_of(folder, eval_ds, tmp_path / "ref")["eval_loss"]
        assert entry["eval_ema_loss"] == pytest.approx(ref, rel=1e-6, abs=1e-7)


@pytest.mark.trainer
def test_bema_lora_folder_loads_with_peft(tmp_path, tiny_model, tokenizer, lm_data):
    from peft import LoraConfig, PeftModel, get_peft_model
    from test_callback import run

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    cfg = EMAConfig(bema={"tau": 1}, update_every=2)
    _, callback, recorder = run(tmp_path, model, lm_data[0], tokenizer, cfg, learning_rate=2e-2)
    assert callback.ema.names and all("lora_" in n for n in callback.ema.names)
    # theta_0 of the adapter only, in the adapter's dtype.
    assert callback.ema.bias_correction.num_bytes() == sum(4 * t.live.numel() for t in callback.ema.named_tensors())
    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    loaded = dict(PeftModel.from_pretrained(base, tmp_path / "checkpoint-6" / "ema").named_parameters())
    want = paper_bema(recorded_theta(recorder), 6, cfg.bema_config, update_every=2)
    for name, value in want.items():
        torch.testing.assert_close(loaded[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
    # The plain EMA of the adapter, written under peft's own keys (from the save's `weights` map).
    plain_dir = write_plain_ema(tmp_path / "checkpoint-6" / "ema", tmp_path / "plain")
    base = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    plain = dict(PeftModel.from_pretrained(base, plain_dir).named_parameters())
    state = callback.ema.state_dict()["tensors"]
    for name in callback.ema.names:
        assert torch.equal(plain[name].detach(), state[name]), name

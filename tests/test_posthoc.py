"""Post-hoc EMA: discrete profiles, inner products, reconstruction against a directly computed power-function EMA
(update_every 1 and 10), snapshots in a real Trainer run (with checkpoint rotation), `hf-ema posthoc`, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _trainer_args import cpu_args
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from hf_ema import CheckpointError, ConfigError, EMACallback, PostHocConfig, PostHocEMA, reconstruct
from hf_ema.cli import main as cli_main
from hf_ema.demo.toy import tiny_causal_lm
from hf_ema.posthoc.profiles import cell_weights, continuous_inner_product, gram_matrix, solve_posthoc_weights


def gamma_of(sigma_rel: float) -> float:
    """Largest real root of sigma_rel^2 (g+2)^2 (g+3) = g+1 (as EDM2 takes it), with numpy (independent of hf_ema).

    There is a second root in (-1, 0) for sigma_rel < sqrt(1/12): the width is not monotonic in gamma there."""
    s2 = sigma_rel**2
    # s2 * (g^3 + 7 g^2 + 16 g + 12) - g - 1 = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return max(r.real for r in roots if abs(r.imag) < 1e-9)


def direct_power_ema(traj: np.ndarray, gamma: float, every: int, upto: int) -> np.ndarray:
    """The power-function EMA of `traj[1..upto]` with the discrete update every `every` steps, in float64."""
    ema = None
    for s in range(every, upto + 1, every):
        beta = (1 - every / s) ** (gamma + 1)
        ema = traj[s].copy() if ema is None else beta * ema + (1 - beta) * traj[s]
    return ema


# ---------------------------------------------------------------------- profiles


@pytest.mark.parametrize("every", [1, 10])
def test_cell_weights_are_the_discrete_ema_weights(every):
    t, gamma = 300, gamma_of(0.1)
    # The EMA of one-hot weight vectors holds the weight of every step.
    weights = direct_power_ema(np.eye(t + 1), gamma, every, t)
    sampled = weights[every::every]
    np.testing.assert_allclose(cell_weights(t, gamma, every), sampled, rtol=1e-10, atol=1e-15)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.count_nonzero(weights) == t // every  # only the sampled steps count


def test_gram_matrix_exact_and_closed_form():
    times, gammas, every = [100, 200, 300, 300], [gamma_of(0.05), gamma_of(0.05), gamma_of(0.1), gamma_of(0.08)], 10
    dense = np.stack([np.repeat(cell_weights(t, g, every, cells=30), every) / every for t, g in zip(times, gammas)])
    # The L2 inner product of the piecewise-constant profiles, summed step by step.
    np.testing.assert_allclose(gram_matrix(times, gammas, every, exact=True), dense @ dense.T, rtol=1e-12)
    closed = gram_matrix(times, gammas, every, exact=False)
    assert closed[0, 1] == pytest.approx(continuous_inner_product(100, gammas[0], 200, gammas[1]))
    # Averaging over cells changes the inner products to second order in (cell / profile length): 25% with 10
    # cells per profile, 100x less with 10x more cells.
    gaps = []
    for cells in (10, 100, 1000):
        ts, gs = [cells * every] * 2, gammas[1:3]
        gaps.append(np.abs(gram_matrix(ts, gs, every, exact=False) / gram_matrix(ts, gs, every, exact=True) - 1).max())
    assert gaps[0] > 0.1
    assert 70 < gaps[0] / gaps[1] < 130 and 70 < gaps[1] / gaps[2] < 130, gaps
    # For one step per cell and long profiles the two agree closely.
    long_times = [5000, 10000, 10000]
    np.testing.assert_allclose(
        gram_matrix(long_times, gammas[1:], 1, exact=True),
        gram_matrix(long_times, gammas[1:], 1, exact=False),
        rtol=1e-3,
    )


def test_solve_reproduces_a_stored_profile():
    g1, g2 = gamma_of(0.05), gamma_of(0.1)
    times = [100, 200, 300, 100, 200, 300]
    x, err = solve_posthoc_weights(times, [g1] * 3 + [g2] * 3, 300, g2, 10)
    np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert err < 1e-6


# ---------------------------------------------------------------------- reconstruction vs a direct power EMA


class Vector(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))


@pytest.mark.parametrize("every", [1, 10])
def test_reconstruction_matches_direct_power_ema(tmp_path, every):
    """Linear drifts (columns 0-15) and noisy random walks (16-31), snapshots of sigma_rel 0.05 and 0.10 every 40
    steps, reconstruction of the unseen sigma_rel 0.08 (and 0.065, 0.15) at the last step and at an earlier step.

    Tolerance: 3e-3 of each coordinate's range over the run, and at most 5% of the gap between the target and the
    closest stored profile. Measured: 4e-4 to 6e-4 of the range for 0.065 / 0.08 at the last step, 1.1e-3 to 1.6e-3
    for the extrapolated 0.15 and for step 280 (fewer snapshots); 1-2% of the gap. The error follows the relative
    profile fit error (0.6-2%); fp32 snapshots add ~1e-7."""
    rng = np.random.default_rng(0)
    steps, every_snap, n = 400, 40, 32
    s = np.arange(steps + 1, dtype=np.float64)[:, None]
    drift = 0.5 + s * rng.uniform(-0.01, 0.01, size=16)
    walk = np.cumsum(rng.normal(scale=0.05, size=(steps + 1, 16)), axis=0)
    traj = np.concatenate([drift, walk], axis=1)

    model = Vector(n)
    phema = PostHocEMA(model, PostHocConfig(sigma_rels=(0.05, 0.10), update_every=every))
    root = tmp_path / "run" / "ema_posthoc"
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(traj[step]))
        phema.update(step)
        if step % every_snap == 0:
            phema.snapshot(root)
    meta = json.loads((root / "step-000000040" / "sigma_rel-0.05" / "ema_state.json").read_text())["posthoc"]
    assert meta["t"] == 40 and meta["update_every"] == every and meta["gamma"] == pytest.approx(gamma_of(0.05))

    span = traj.max(axis=0) - traj.min(axis=0)
    for sigma_rel, step in [(0.08, 400), (0.065, 400), (0.15, 400), (0.08, 280)]:
        out = reconstruct(tmp_path / "run", sigma_rel, tmp_path / f"rec-{sigma_rel}-{step}", step=step, progress=False)
        got = load_file(str(out / "model.safetensors"))["w"].double().numpy()
        want = direct_power_ema(traj, gamma_of(sigma_rel), every, step)
        nearest = min(
            (direct_power_ema(traj, gamma_of(sr), every, t) for sr in (0.05, 0.1) for t in (step,)),
            key=lambda e: np.abs(e - want).max(),
        )
        err = np.abs(got - want)
        assert np.all(err <= 3e-3 * span), (sigma_rel, step, (err / span).max())
        assert err.max() <= 0.05 * np.abs(nearest - want).max(), (sigma_rel, step)
        recipe = json.loads((out / "posthoc_recipe.json").read_text())
        assert recipe["t"] == step and recipe["update_every"] == every
        assert sum(sn["weight"] for sn in recipe["snapshots"]) == pytest.approx(1.0)


def test_ignoring_the_interval_is_wrong():
    """The per-update beta must use the real step count: with beta = (1 - 1/t)^(g+1) at t = step (as ema-pytorch's
    KarrasEMA does) while updating every 100 steps, a linear drift to 20000 averages to far below the ideal."""
    gamma, steps, every = gamma_of(0.1), 20000, 100
    right = wrong = None
    for s in range(every, steps + 1, every):
        b_right, b_wrong = (1 - every / s) ** (gamma + 1), (1 - 1 / s) ** (gamma + 1)
        right = float(s) if right is None else b_right * right + (1 - b_right) * s
        wrong = float(s) if wrong is None else b_wrong * wrong + (1 - b_wrong) * s
    ideal = steps * (gamma + 1) / (gamma + 2)  # mean of the continuous profile
    assert abs(right - ideal) / ideal < 0.01
    assert wrong < 0.2 * ideal


# ---------------------------------------------------------------------- a real Trainer run


@pytest.mark.trainer
def test_trainer_run_posthoc_cli(tmp_path, tokenizer, lm_data, capsys):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    run = tmp_path / "run"
    args = cpu_args(
        run,
        max_steps=9,
        save_steps=3,
        save_total_limit=1,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
    )
    callback = EMACallback(decay=0.8, eval_ema=False, posthoc=PostHocConfig(snapshot_every=2))
    Trainer(model=model, args=args, train_dataset=lm_data[0], processing_class=tokenizer, callbacks=[callback]).train()

    # Rotation deleted the old checkpoints, not the snapshots (every 2 steps, plus the final step 9).
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-9"]
    steps = sorted(p.name for p in (run / "ema_posthoc").glob("step-*"))
    assert steps == [f"step-{s:09d}" for s in (2, 4, 6, 8, 9)]
    assert (run / "checkpoint-9" / "ema_posthoc" / "sigma_rel-0.1" / "model.safetensors").is_file()
    final = load_file(str(run / "ema_posthoc" / "step-000000009" / "sigma_rel-0.1" / "model.safetensors"))
    live = {k: v.detach() for k, v in model.state_dict().items()}
    assert any(not torch.equal(final[k], live[k]) for k in final)  # an average, not the raw weights

    out = tmp_path / "ema-0.08"
    assert cli_main(["posthoc", str(run), "--sigma-rel", "0.08", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "sigma_rel=0.08" in said and "from 10 snapshots (sigma_rel 0.05 and 0.1 at 5 steps, 2–9)" in said
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    AutoTokenizer.from_pretrained(out)
    recipe = json.loads((out / "posthoc_recipe.json").read_text())
    assert recipe["step"] == 9 and len(recipe["snapshots"]) == 10
    snaps = {
        sn["path"]: load_file(str(run / "ema_posthoc" / sn["path"].split("ema_posthoc/")[1] / "model.safetensors"))
        for sn in recipe["snapshots"]
    }
    for name in final:
        want = sum(sn["weight"] * snaps[sn["path"]][name].double() for sn in recipe["snapshots"])
        torch.testing.assert_close(loaded[name].double(), want, rtol=0, atol=1e-5)

    # An earlier step uses the snapshots taken at or before it, and says so; before the first one is an error.
    early = tmp_path / "ema-0.08-step-4"
    assert cli_main(["posthoc", str(run), "--sigma-rel", "0.08", "--step", "4", "--out", str(early)]) == 0
    assert "at step 4 from 4 snapshots (sigma_rel 0.05 and 0.1 at 2 steps, 2–4)" in capsys.readouterr().out
    recipe = json.loads((early / "posthoc_recipe.json").read_text())
    assert sorted({sn["step"] for sn in recipe["snapshots"]}) == [2, 4]
    assert sorted({round(sn["sigma_rel"], 6) for sn in recipe["snapshots"]}) == [0.05, 0.1]
    assert cli_main(["posthoc", str(run), "--sigma-rel", "0.08", "--step", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "hf-ema posthoc: error: `--step` must be within the snapshots' range (2..9), got 1: the EMA at a step is "
        "built from the snapshots taken at or before it"
    ]
    assert not (tmp_path / "x").exists()

    # Reconstructing a stored profile gives it back.
    same = reconstruct(run, 0.1, tmp_path / "ema-0.1", progress=False)
    got = load_file(str(same / "model.safetensors"))
    for name, value in final.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5)


@pytest.mark.trainer
def test_posthoc_resume_matches_uninterrupted(tmp_path, tokenizer, lm_data):
    def train(out, max_steps, resume=None):
        args = cpu_args(
            out,
            max_steps=max_steps,
            lr_scheduler_type="constant",  # a linear decay would depend on max_steps and differ between the runs
            save_steps=3,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
        )
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
        callback = EMACallback(decay=0.8, eval_ema=False, posthoc={"snapshot_every": 2, "update_every": 2})
        Trainer(model=model, args=args, train_dataset=lm_data[0], callbacks=[callback]).train(
            resume_from_checkpoint=resume
        )

    train(tmp_path / "full", 6)
    train(tmp_path / "split", 3)
    train(tmp_path / "split", 6, resume=str(tmp_path / "split" / "checkpoint-3"))
    for step in (4, 6):
        for sigma in ("0.05", "0.1"):
            sub = f"ema_posthoc/step-{step:09d}/sigma_rel-{sigma}"
            a = load_file(str(tmp_path / "full" / sub / "model.safetensors"))
            b = load_file(str(tmp_path / "split" / sub / "model.safetensors"))
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
            ta = json.loads((tmp_path / "full" / sub / "ema_state.json").read_text())["posthoc"]
            tb = json.loads((tmp_path / "split" / sub / "ema_state.json").read_text())["posthoc"]
            assert ta == tb and ta["t"] == step


# ---------------------------------------------------------------------- errors


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="sigma_rels"):
        PostHocConfig(sigma_rels=(0.05, 0.3))
    with pytest.raises(ConfigError, match="snapshot_every"):
        PostHocConfig(snapshot_every=0)
    with pytest.raises(ConfigError, match="sigma_rel"):
        EMACallback(posthoc={"sigma_rels": (0.05, 0.05)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "empty", 0.08)
    with pytest.raises(ConfigError, match="exactly one"):
        reconstruct(tmp_path / "empty")
    assert cli_main(["posthoc", str(tmp_path / "empty"), "--sigma-rel", "0.08"]) == 2


def test_fresh_run_moves_earlier_snapshots_aside(tmp_path):
    """A new run in the same output_dir must not mix its snapshots with an earlier run's."""
    from types import SimpleNamespace

    old = tmp_path / "ema_posthoc" / "step-000000010" / "sigma_rel-0.05"
    old.mkdir(parents=True)
    (old / "ema_state.json").write_text("{}")
    phema = PostHocEMA(Vector(4))
    phema.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0), [])
    assert not list((tmp_path / "ema_posthoc").glob("step-*"))
    assert json.loads((tmp_path / "ema_posthoc" / "posthoc_config.json").read_text())["sigma_rels"] == [0.05, 0.1]
    moved = list(tmp_path.glob("ema_posthoc.previous-*"))
    assert len(moved) == 1 and (moved[0] / "step-000000010" / "sigma_rel-0.05" / "ema_state.json").is_file()

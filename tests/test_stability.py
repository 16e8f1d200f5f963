"""Stability metrics: relative distance and oscillation frequency (hf_ema.stability), alone and in a Trainer run."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _trainer_args import cpu_args
from safetensors.torch import load_file
from transformers import Trainer

from hf_ema import ConfigError, ConfigTypeError, EMACallback
from hf_ema.stability import OscillationTracker, StabilityConfig, relative_distance


def _reference_frequency(values: list[float], momentum: float) -> float:
    """Nagel et al.'s oscillation EMA for one weight's trajectory, written out with plain floats."""
    f, last = 0.0, 0
    for prev, cur in zip(values, values[1:]):
        delta = cur - prev
        s = (delta > 0) - (delta < 0)
        o = 1 if (s != 0 and last != 0 and s != last) else 0
        f = momentum * o + (1 - momentum) * f
        if s != 0:
            last = s
    return f


def _run_tracker(trajectory: torch.Tensor, **kw) -> OscillationTracker:
    """Feed `trajectory` (steps x weights) to a tracker watching one live tensor."""
    live = trajectory[0].clone()
    tracker = OscillationTracker([live], sample_size=live.numel(), **kw)
    for row in trajectory:
        live.copy_(row)
        tracker.update()
    return tracker


def test_oscillation_matches_reference_on_patterns():
    # Weight j moves +1 for k_j steps, then -1 for k_j steps, ...: one flip every k_j steps; weight 4 also pauses.
    steps = 120
    moves = torch.zeros(steps, 5)
    for j, k in enumerate([1, 2, 3, 5]):
        moves[:, j] = torch.tensor([1.0 if (t // k) % 2 == 0 else -1.0 for t in range(steps)])
    moves[:, 4] = torch.tensor([[1.0, 0.0, -1.0, 0.0][t % 4] for t in range(steps)])  # zero moves do not count
    trajectory = torch.cat([torch.zeros(1, 5), moves.cumsum(0)])
    tracker = _run_tracker(trajectory, momentum=0.05, threshold=0.3)
    expected = [_reference_frequency(trajectory[:, j].tolist(), 0.05) for j in range(5)]
    assert tracker.frequency.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Flip every step -> f close to 1; every 2 steps -> about 0.5, etc.
    assert expected[0] > 0.99 and 0.4 < expected[1] < 0.6 and 0.25 < expected[2] < 0.45
    summary = tracker.summary()
    assert summary["ema_osc_frac"] == pytest.approx(sum(f > 0.3 for f in expected) / 5)
    assert summary["ema_osc_freq_mean"] == pytest.approx(sum(expected) / 5, rel=1e-5)


def test_oscillation_known_flip_rate_random():
    # Half of the weights reverse direction with probability p at each step, the other half move monotonically.
    gen = torch.Generator().manual_seed(0)
    n, steps, p, m = 2000, 1500, 0.3, 0.01
    flips = torch.rand(steps, n, generator=gen) < p
    flips[:, n // 2 :] = False
    direction = torch.where(flips, -1.0, 1.0).cumprod(0)
    magnitude = torch.rand(steps, n, generator=gen) + 0.1
    trajectory = torch.cat([torch.zeros(1, n), (direction * magnitude).cumsum(0)])
    tracker = _run_tracker(trajectory, momentum=m, threshold=0.1)
    f = tracker.frequency
    # The stationary mean of the flip EMA is the flip rate (the start-up transient is (1 - m)^1500 ~ 3e-7).
    assert f[: n // 2].mean().item() == pytest.approx(p, abs=0.01)
    assert f[n // 2 :].abs().max().item() == 0.0
    assert tracker.summary()["ema_osc_frac"] == pytest.approx(0.5, abs=0.01)


def test_sample_is_uniform_subset_and_reads_live_values():
    a, b = torch.randn(1000), torch.randn(30, 100)
    tracker = OscillationTracker([a, b, torch.zeros(0), torch.arange(5)], sample_size=400, seed=3)
    # 400 draws among 4000 weights (with replacement: a few repeats are dropped).
    assert 370 <= tracker.num_sampled <= 400 and tracker.num_watched == 4000
    counts = [idx.numel() for idx in tracker._index]
    assert sum(counts) == tracker.num_sampled and 50 < counts[0] < 150  # about a quarter from `a`
    assert all(torch.equal(i.unique(), i) for i in tracker._index)  # distinct, sorted
    dense = OscillationTracker([a], sample_size=500)  # sample >= a quarter of the weights: a permutation
    assert dense.num_sampled == 500
    values = tracker._gather()
    expected = torch.cat([a[tracker._index[0]], b.reshape(-1)[tracker._index[1]]])
    assert torch.equal(values, expected)
    small = OscillationTracker([torch.randn(7)], sample_size=100)
    assert small.num_sampled == 7


def test_relative_distance_matches_flat_norm():
    gen = torch.Generator().manual_seed(1)
    ema = [torch.randn(10, 4, generator=gen), torch.randn(3, generator=gen)]
    live = [(e + 0.1 * torch.randn(e.shape, generator=gen)).to(torch.bfloat16) for e in ema]
    flat_live = torch.cat([t.double().reshape(-1) for t in live])
    flat_ema = torch.cat([t.double().reshape(-1) for t in ema])
    expected = ((flat_live - flat_ema).norm() / flat_ema.norm()).item()
    assert relative_distance(live, ema) == pytest.approx(expected, rel=1e-6)
    assert relative_distance(ema, ema) == 0.0
    with pytest.raises(ConfigError, match="same length"):
        relative_distance(live, ema[:1])


def test_config_validation():
    assert StabilityConfig.coerce(False) is None and StabilityConfig.coerce(None) is None
    assert StabilityConfig.coerce(True) == StabilityConfig()
    assert StabilityConfig.coerce({"threshold": 0.2}).threshold == 0.2
    with pytest.raises(ConfigError, match="`momentum`"):
        StabilityConfig(momentum=0.0)
    with pytest.raises(ConfigError, match="`sample_size`"):
        StabilityConfig(sample_size=0)
    with pytest.raises(ConfigTypeError, match="`stability_metrics`"):
        EMACallback(stability_metrics="yes")


def _dist_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        ema = [torch.randn(50, generator=gen) for _ in range(4)]
        live = [e + 0.2 * torch.randn(50, generator=gen) for e in ema]
        # Each rank holds half of every tensor, as a sharded layout would.
        mine = slice(rank * 25, (rank + 1) * 25)
        dist = relative_distance([t[mine] for t in live], [t[mine] for t in ema])
        trajectory = torch.stack([torch.full((10,), float(rank * i % 3)) for i in range(20)])
        tracker = _run_tracker(trajectory, momentum=0.1, threshold=0.05)
        queue.put((rank, dist, tracker.summary(), relative_distance(live, ema, reduce=False)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_reduction_across_ranks_gloo():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_dist_worker, args=(2, port, queue), nprocs=2, start_method="spawn", join=True)
    results = sorted(queue.get() for _ in range(2))
    full = results[0][3]
    # Both ranks see the global value, equal to the unsharded computation (fp32 per-tensor norms).
    assert results[0][1] == pytest.approx(full, rel=1e-6) and results[1][1] == pytest.approx(full, rel=1e-6)
    # Rank 0's weights never move (f = 0), rank 1's oscillate: half of all sampled weights are above threshold.
    assert results[0][2]["ema_osc_frac"] == pytest.approx(0.5) and results[1][2] == results[0][2]


@pytest.mark.trainer
def test_callback_logs_stability_metrics(tmp_path, tiny_model, tokenizer, lm_data):
    train_ds, _ = lm_data
    out = tmp_path / "run"
    args = cpu_args(
        out,
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=4,
        save_steps=8,
    )
    callback = EMACallback(decay=0.8, stability_metrics={"sample_size": 512, "momentum": 0.1, "threshold": 0.2})
    trainer = Trainer(model=tiny_model, args=args, train_dataset=train_ds, callbacks=[callback])
    seen = []

    class Reporter(__import__("transformers").TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer.add_callback(Reporter())
    trainer.train()
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in train_logs] == [4, 8]
    for entry in train_logs:
        assert 0.0 <= entry["ema_osc_frac"] <= 1.0 and 0.0 <= entry["ema_osc_freq_mean"] <= 1.0
        assert entry["ema_rel_distance"] > 0
    # A reporter called after us (TensorBoard, W&B) gets the same values in the same entry.
    reported = [e for e in seen if "loss" in e]
    assert [e["ema_rel_distance"] for e in reported] == [e["ema_rel_distance"] for e in train_logs]
    # Independent check at step 8: from the raw checkpoint and its ema/ folder, over the averaged tensors.
    raw = load_file(str(out / "checkpoint-8" / "model.safetensors"))
    ema = load_file(str(out / "checkpoint-8" / "ema" / "model.safetensors"))
    names = [n for n in callback.ema.names if n in raw]
    assert len(names) == len(callback.ema.names)
    diff = sum((raw[n].double() - ema[n].double()).square().sum().item() for n in names)
    norm = sum(ema[n].double().square().sum().item() for n in names)
    assert train_logs[-1]["ema_rel_distance"] == pytest.approx(math.sqrt(diff / norm), rel=1e-5)
    assert callback.stability.tracker.num_updates == 7  # 8 steps: the first only records the start


@pytest.mark.trainer
def test_oscillation_state_resumes_exactly(tmp_path, tokenizer, lm_data):
    """A run resumed from checkpoint-4 logs the same oscillation frequencies at steps 5-8 as the uninterrupted run:
    the tracker's state is saved per rank in `checkpoint-N/ema_stability/` and restored with the EMA."""
    import shutil

    from hf_ema.demo.toy import tiny_causal_lm
    from hf_ema.stability import STABILITY_DIRNAME

    def train(out, resume=None):
        args = cpu_args(
            out,
            max_steps=8,
            per_device_train_batch_size=8,
            learning_rate=2e-2,
            logging_steps=1,
            save_steps=4,
        )
        callback = EMACallback(
            decay=0.8, stability_metrics={"sample_size": 512, "momentum": 0.3, "threshold": 0.2, "seed": 3}
        )
        model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=lm_data[0], callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return {
            e["step"]: (e["ema_osc_frac"], e["ema_osc_freq_mean"]) for e in trainer.state.log_history if "loss" in e
        }

    full = train(tmp_path / "full")
    saved = tmp_path / "full" / "checkpoint-4" / STABILITY_DIRNAME / "rank-00000-of-00001.safetensors"
    assert saved.is_file()
    assert any(v[1] > 0 for s, v in full.items() if s > 4)  # the frequencies are not trivially zero

    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "copy" / "checkpoint-4")
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "copy" / "checkpoint-4"))
    assert sorted(resumed) == list(range(1, 9))  # steps 1-4 come back with the trainer state
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(full[step], abs=1e-7), step

    # Without the saved state the tracker starts again (the first step after resume only records the weights).
    shutil.rmtree(tmp_path / "copy" / "checkpoint-4" / STABILITY_DIRNAME)
    restarted = train(tmp_path / "restarted", resume=str(tmp_path / "copy" / "checkpoint-4"))
    assert restarted[5] == (0.0, 0.0) and restarted[5] != full[5]


def test_oscillation_state_round_trip_and_bad_files(tmp_path, caplog):
    """`StabilityMonitor.save` / `restore` without a Trainer: an exact round trip, and a corrupt file, another
    sample size or another world size each restart the frequencies from zero instead of failing the resume."""
    import logging

    from hf_ema import ModelEMA
    from hf_ema.stability import StabilityMonitor

    model = torch.nn.Linear(40, 30)
    ema = ModelEMA(model, decay=0.9)
    config = StabilityConfig(sample_size=300, momentum=0.3)
    monitor = StabilityMonitor(config)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.update()
        monitor.step(ema)
    path = monitor.save(tmp_path / "state", rank=1, world_size=2)
    assert path.name == "rank-00001-of-00002.safetensors"

    restored = StabilityMonitor(config)
    assert restored.restore(ema, tmp_path / "state", rank=1, world_size=2)
    assert torch.equal(restored.tracker.frequency, monitor.tracker.frequency)
    assert restored.tracker.num_updates == monitor.tracker.num_updates == 5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    monitor.step(ema)
    restored.step(ema)
    assert restored.tracker.summary() == monitor.tracker.summary()

    with caplog.at_level(logging.INFO, logger="hf_ema.stability"):
        assert not StabilityMonitor(config).restore(ema, tmp_path / "state", rank=0, world_size=1)  # no such file
        other = StabilityMonitor(StabilityConfig(sample_size=100, momentum=0.3))
        assert not other.restore(ema, tmp_path / "state", rank=1, world_size=2)
        assert other.tracker.num_updates == 0 and float(other.tracker.frequency.sum()) == 0.0
        path.write_bytes(b"not a safetensors file")
        corrupt = StabilityMonitor(config)
        assert not corrupt.restore(ema, tmp_path / "state", rank=1, world_size=2)
        assert corrupt.tracker.num_updates == 0
    assert caplog.text.count("start again from zero") == 3

"""Crash consistency of the EMA across the whole checkpoint: a training run SIGKILLed at random moments, and inside
the window between the Trainer's checkpoint and its `ema/`, resumed each time with `resume_from_checkpoint=True`,
ends with the uninterrupted run's EMA bit for bit (or stops with the clear error); an interrupted replace of an
`ema/` folder is recovered by the next reader."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

WORKER = Path(__file__).parent / "_crash_worker.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer, lm_data):
    folder = tmp_path_factory.mktemp("crash_data")
    tokenizer.save_pretrained(folder)
    blocks = lm_data[0].input_ids[:96]
    save_file({"input_ids": blocks.contiguous()}, str(folder / "blocks.safetensors"))
    return folder


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("HF_EMA_COMPILE", None)
    return env


def _start(out: Path, data: Path, kill: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(out), str(data)] + (["--kill", kill] if kill else [])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _run(out: Path, data: Path, kill: str | None = None) -> tuple[int, str, str]:
    proc = _start(out, data, kill)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def _wait_training(proc: subprocess.Popen, timeout: float = 120.0) -> float:
    """Block until the worker prints TRAINING; returns when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == "TRAINING":
            return time.monotonic()
    return time.monotonic()


def _final_ema(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "ema"
    exact = folder / "ema_state.safetensors"
    return load_file(str(exact if exact.is_file() else folder / "model.safetensors"))


def _read_state(out: Path) -> dict:
    import json

    return json.loads((out / "ema" / "ema_state.json").read_text())


def _no_leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob(".ema.*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.timeout(1800)
def test_random_sigkills_and_the_checkpoint_window_keep_the_ema_exact(tmp_path, data_dir):
    reference = tmp_path / "uninterrupted"
    code, _, err = _run(reference, data_dir)
    assert code == 0, err
    expected = _final_ema(reference)
    expected_updates = _read_state(reference)["num_updates"]

    # Time of the training part of a run, to draw kill moments from.
    probe = _start(tmp_path / "probe", data_dir)
    t0 = _wait_training(probe)
    probe.communicate(timeout=300)
    train_seconds = max(time.monotonic() - t0, 0.5)

    rng = random.Random(0)

    history: list[str] = []

    def state_of(run_dir: Path) -> str:
        if not run_dir.is_dir():
            return "-"
        return " ".join(
            f"{c.name}[{'T' if (c / 'trainer_state.json').is_file() else ''}{'E' if (c / 'ema').is_dir() else ''}]"
            for c in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        )

    def check_exact(run_dir: Path) -> None:
        got = _final_ema(run_dir)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (run_dir.name, name, "\n".join(history))
        assert _read_state(run_dir)["num_updates"] == expected_updates
        assert not _no_leftovers(run_dir), _no_leftovers(run_dir)

    # Each episode is one training run, killed and resumed until it completes; then the next episode starts.
    # Deterministic kills inside the crash windows first, then random ones, until at least 20 kills.
    windows = ["window:8", "tmp:12", "window:16"]
    outcomes = {"exact": 0, "clear_error": 0}
    kills = 0
    episode = 0
    run_dir = tmp_path / "episode-0"
    while True:
        if windows:
            code, _, err = _run(run_dir, data_dir, windows.pop(0))
            assert code == -signal.SIGKILL, (code, err)
            kills += 1
            continue
        before = state_of(run_dir)
        proc = _start(run_dir, data_dir)
        if kills < 20:
            t0 = _wait_training(proc)
            time.sleep(max(0.0, rng.uniform(0, train_seconds) - (time.monotonic() - t0)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        notes = [line for line in err.splitlines() if "resuming from" in line or "Error" in line]
        history.append(f"{run_dir.name}: {before} -> rc {proc.returncode} -> {state_of(run_dir)} {notes}")
        if proc.returncode in (0, 3):
            if proc.returncode == 0:
                check_exact(run_dir)
                outcomes["exact"] += 1
            else:  # the resume refused: no checkpoint with a complete EMA is left
                assert "has no complete `ema/`" in err and "allow_ema_restart=True" in err, err
                outcomes["clear_error"] += 1
            if kills >= 20:
                break
            episode += 1
            run_dir = tmp_path / f"episode-{episode}"
        else:
            assert proc.returncode == -signal.SIGKILL, err
    assert kills >= 20 and outcomes["exact"] >= 1, outcomes


def test_interrupted_replace_is_recovered(tmp_path, tokenizer):
    """Killed between the two renames of a replace (`ema/` -> `.ema.old-*`, `.ema.tmp-*` -> `ema/`): no `ema/` is on
    disk, and the next reader brings the previous, complete one back."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
from hf_ema import ModelEMA, save_ema
from hf_ema.demo.toy import tiny_causal_lm
from hf_ema.utils import atomic
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast.from_pretrained({str(tmp_path / "tok")!r})
model = tiny_causal_lm(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)
ema = ModelEMA(model, decay=0.5)
save_ema(ema, {str(tmp_path / "ema")!r})
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ema.update()
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if ".ema.old-" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace
save_ema(ema, {str(tmp_path / "ema")!r})
"""
    tokenizer.save_pretrained(tmp_path / "tok")
    first = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (tmp_path / "ema").exists()
    assert list(tmp_path.glob(".ema.old-*")) and list(tmp_path.glob(".ema.tmp-*"))

    from hf_ema import ModelEMA, load_ema, read_ema_state
    from hf_ema.demo.toy import tiny_causal_lm

    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    state = read_ema_state(tmp_path / "ema")  # the reader recovers the previous folder
    assert state["num_updates"] == 0 and (tmp_path / "ema").is_dir()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    ema.reset()
    load_ema(ema, tmp_path / "ema")
    fresh = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    for (name, value), shadow in zip(fresh.named_parameters(), ema.shadow):
        assert torch.equal(value.float(), shadow), name

"""Damaged `ema/` folders, a full disk and impossible values: each ends in one clear line that names the file or
the value (and, on resume, the checkpoint to resume from instead), an `HfEmaError`, exit code 2 from the CLI; a NaN
in a saved EMA stops the resume."""

from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest
import torch
from test_faults_cli import assert_one_line_error, hf_ema
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_ema import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    EMACallback,
    EMAConfig,
    HfEmaError,
    ModelEMA,
    load_ema,
    reconstruct,
    save_ema,
)
from hf_ema.utils.safetensors_files import read_header


def _saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    ema = ModelEMA(model, decay=0.5)
    save_ema(ema, tmp_path / "ema")
    return model, tmp_path / "ema"


def _edit_state(folder, **changes):
    path = folder / "ema_state.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            del meta[key]
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))
    return path


_DROP = object()


def _one_line(err: BaseException, *needles: str) -> str:
    message = str(err)
    assert isinstance(err, HfEmaError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.mark.parametrize("value", ["2", None, 2.0, -1])
def test_format_version_not_a_number(tmp_path, value):
    model, folder = _saved(tmp_path)
    path = _edit_state(folder, format_version=value)
    with pytest.raises(CheckpointError) as info:
        load_ema(ModelEMA(model, decay=0.5), folder)
    _one_line(info.value, f"`{path}` is corrupt", f"`format_version` is {value!r}")


@pytest.mark.parametrize("key", ["step", "num_updates"])
def test_missing_step(tmp_path, key):
    model, folder = _saved(tmp_path)
    path = _edit_state(folder, **{key: _DROP})
    with pytest.raises(CheckpointError) as info:
        load_ema(ModelEMA(model, decay=0.5), folder)
    _one_line(info.value, f"`{path}` is corrupt: it has no `{key}`")


def test_garbage_safetensors_header(tmp_path):
    model, folder = _saved(tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"\xff{not json" + b" " * (length - 10)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_ema(ModelEMA(model, decay=0.5), folder)
    _one_line(info.value, f"`{path}` is corrupt: its safetensors header is not JSON")


def test_full_disk_in_the_ema_write(tmp_path, monkeypatch):
    """ENOSPC while the tensors are written (injected into the second write): one line naming the folder and
    saying the previous `ema/` is intact, which it is; the EMA in memory is kept."""
    import hf_ema.ema_folder.parts as parts

    model, folder = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    real, calls = parts.write_elements, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(parts, "write_elements", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_ema(ema, folder)
    _one_line(info.value, f"`{folder}`", "No space left on device", f"the previous `{folder}` is intact")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]
    # A first save (no previous folder) says that nothing was left behind.
    calls.clear()
    with pytest.raises(CheckpointWriteError, match=f"nothing was left at `{tmp_path / 'new'}`"):
        save_ema(ema, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]


def test_posthoc_sigma_rel_too_small(tmp_path):
    for call in (lambda: reconstruct(tmp_path, sigma_rel=1e-300), lambda: EMAConfig(sigma_rel=1e-300)):
        with pytest.raises(ConfigError) as info:
            call()
        _one_line(info.value, "`sigma_rel` must be at least 1e-09", "got 1e-300")
    proc = hf_ema("posthoc", str(tmp_path), "--sigma-rel", "1e-300")
    assert_one_line_error(proc, "posthoc", "`--sigma-rel` must be at least 1e-09", "got 1e-300")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- resume
class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _trainer(out, tokenizer, lm_data, **ema_kwargs):
    from _trainer_args import cpu_args

    from hf_ema.demo.toy import tiny_causal_lm

    steps = _Steps()
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    args = cpu_args(out, max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=5e-3)
    callback = EMACallback(decay=0.9, **ema_kwargs)
    return Trainer(model=model, args=args, train_dataset=lm_data[0], callbacks=[callback, steps]), steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer, lm_data):
    """A 4-step run with checkpoints 2 and 4. Read-only: tests damage copies."""
    out = tmp_path_factory.mktemp("resume") / "run"
    _trainer(out, tokenizer, lm_data)[0].train()
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_into(path, key):
    start, header, _ = read_header(path)
    entry = header[key]
    assert entry["dtype"] == "F32"
    with open(path, "r+b") as f:
        f.seek(start + entry["data_offsets"][0] + 4 * 5)  # the sixth element
        f.write(struct.pack("<f", float("nan")))


@pytest.mark.trainer
@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_damaged_ema_stops_the_resume_naming_the_checkpoint_to_use(run_copy, tokenizer, lm_data, damage):
    """A truncated weights file, or a NaN written into the saved EMA: the resume stops before step 5 with one line
    that names the file (or the tensor) and `checkpoint-2`, the checkpoint to resume from instead."""
    weights = run_copy / "checkpoint-4" / "ema" / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "truncated":
        _truncate(weights)
        needles = [f"`{weights}` is truncated"]
    else:
        _nan_into(weights, name)
        needles = [f"`{run_copy / 'checkpoint-4' / 'ema'}` holds NaN or inf in the EMA tensor {name!r}"]
    trainer, steps = _trainer(run_copy, tokenizer, lm_data)
    trainer.args.max_steps = 6
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=True)
    _one_line(info.value, *needles, "complete: checkpoint-2)", "allow_ema_restart=True")
    assert "checkpoint-4" not in str(info.value).split("complete:")[1]
    assert steps.steps == []
    if damage == "nan":  # `on_nonfinite="ignore"` loads it as it is
        trainer, steps = _trainer(run_copy, tokenizer, lm_data, on_nonfinite="ignore")
        trainer.args.max_steps = 6
        trainer.train(resume_from_checkpoint=True)
        assert steps.steps == [5, 6]

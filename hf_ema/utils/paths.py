"""The names and path rules of a training run: `checkpoint-N/`, `ema/`, post-hoc snapshots, the marker of a folder
hf-ema wrote. Every module asks these helpers instead of spelling the rules out again."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "CHECKPOINT_PREFIX",
    "EMA_DIRNAME",
    "MARKER_NAME",
    "POSTHOC_DIRNAME",
    "STABILITY_DIRNAME",
    "STATE_NAME",
    "TENSORS_NAME",
    "TRAINER_STATE_NAME",
    "WEIGHT_NAMES",
    "checkpoint_dir",
    "checkpoint_step",
    "is_ema_folder",
    "is_run_folder",
    "list_checkpoints",
    "posthoc_step",
]

#: The Trainer's checkpoint folders are `<output_dir>/checkpoint-<global_step>`.
CHECKPOINT_PREFIX = "checkpoint"
#: The EMA of a checkpoint (or of the final model) is the `ema/` folder inside it.
EMA_DIRNAME = "ema"
#: The EMA state of an `ema/` folder: step, updates, decay, config, format version.
STATE_NAME = "ema_state.json"
#: The EMA tensors in their own dtype (fp32), written when the weights files cannot restore them exactly.
TENSORS_NAME = "ema_state.safetensors"
#: Post-hoc EMA snapshots and states (`ema_posthoc/step-N/sigma_rel-S/`).
POSTHOC_DIRNAME = "ema_posthoc"
#: Per-rank oscillation-tracker states inside a checkpoint.
STABILITY_DIRNAME = "ema_stability"
#: The Trainer's state file, in every checkpoint and (at the end) in the run folder.
TRAINER_STATE_NAME = "trainer_state.json"
#: Written into every output folder hf-ema creates (merge, posthoc, push staging, demo, raw/), so `overwrite=True`
#: replaces only folders hf-ema itself wrote.
MARKER_NAME = ".hf_ema_output"
#: A PEFT adapter's config: a folder holding it is an adapter (`PeftModel.from_pretrained` loads it).
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: The weight files `from_pretrained` loads a model or an adapter from (one file, or a sharded index).
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)")
_POSTHOC_STEP_RE = re.compile(r"step-(\d+)")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """`<output_dir>/checkpoint-<step>`, the folder the Trainer writes at `step`."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-N` folder name, or `None` when `path` is not named like one."""
    match = _CHECKPOINT_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of a run, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def posthoc_step(path: str | os.PathLike) -> int | None:
    """The step of a post-hoc snapshot folder `step-N`, or `None`."""
    match = _POSTHOC_STEP_RE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_ema_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is an `ema/` folder written by hf-ema (it holds `ema_state.json`)."""
    return (Path(path) / STATE_NAME).is_file()


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's output folder (or a checkpoint): it holds `checkpoint-N/` folders, the
    Trainer's state, an `ema/` or post-hoc snapshots."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / TRAINER_STATE_NAME).is_file() or (path / POSTHOC_DIRNAME).is_dir():
        return True
    if (path / EMA_DIRNAME / STATE_NAME).is_file() and not (path / MARKER_NAME).is_file():
        return True
    return bool(list_checkpoints(path))

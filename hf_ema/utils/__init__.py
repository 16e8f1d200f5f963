"""Small rules used everywhere: path names of a run (`checkpoint-N/`, `ema/`), crash-safe folder writes, argument
validation and JSON I/O."""

from .atomic import atomic_folder, commit_folder, recover_folder
from .jsonio import read_json, write_json
from .paths import (
    CHECKPOINT_PREFIX,
    EMA_DIRNAME,
    MARKER_NAME,
    POSTHOC_DIRNAME,
    STABILITY_DIRNAME,
    STATE_NAME,
    TENSORS_NAME,
    checkpoint_dir,
    checkpoint_step,
    is_ema_folder,
    is_run_folder,
    list_checkpoints,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "EMA_DIRNAME",
    "MARKER_NAME",
    "POSTHOC_DIRNAME",
    "STABILITY_DIRNAME",
    "STATE_NAME",
    "TENSORS_NAME",
    "atomic_folder",
    "checkpoint_dir",
    "checkpoint_step",
    "commit_folder",
    "is_ema_folder",
    "is_run_folder",
    "list_checkpoints",
    "read_json",
    "recover_folder",
    "write_json",
]

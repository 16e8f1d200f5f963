"""`save_ema`: plan -> write parts -> commit."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointWriteError
from ..model_ema import ModelEMA
from ..sharding.collectives import Ranks
from ..utils.atomic import atomic_folder
from ..utils.validation import check_optional_bool, check_size
from .commit import commit
from .library import default_max_shard_size
from .parts import write_parts
from .plan import SaveJob
from .planning import plan_save
from .sources import SaveSources

__all__ = ["save_ema"]


def save_ema(
    ema: ModelEMA,
    output_dir: str | os.PathLike,
    processing_class: Any | None = None,
    extra_state: dict[str, Any] | None = None,
    *,
    max_shard_size: int | str | None = None,
    shared_filesystem: bool | None = None,
) -> Path | None:
    """Write the EMA as a `save_pretrained` folder, atomically. A collective call: every rank must make it.

    The folder holds what the model's own `save_pretrained` writes (`config.json`, `model.safetensors` or
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`, `generation_config.json`; for a PEFT
    model `adapter_config.json` and `adapter_model.safetensors`; for a diffusers model
    `diffusion_pytorch_model.safetensors`), with the EMA in the model's dtype; the tokenizer files when
    `processing_class` is given; `ema_state.safetensors` with the EMA tensors that the weights cannot hold exactly
    (the fp32 EMA of a bf16 model); `ema_state.json` and `ema_config.json`. See docs/reference/ema_format.md.

    Nothing is gathered: every rank writes its own part of each tensor straight into the files (each part is one
    contiguous byte range of the file), and the main process renames the folder into place once all are written.
    Without a filesystem that every rank sees, the parts go through the main process, one at a time.

    Args:
        ema (`ModelEMA`): The EMA to save.
        output_dir (`str` or `os.PathLike`): The folder to write, e.g. `checkpoint-100/ema`.
        processing_class (*optional*): A tokenizer / processor saved alongside.
        extra_state (`dict`, *optional*): More JSON-serialisable entries for `ema_state.json`.
        max_shard_size (`int` or `str`, *optional*): Largest weights file, e.g. `"5GB"`; bigger models are split
            into several files as `save_pretrained` splits them. Defaults to the model's `save_pretrained` default.
        shared_filesystem (`bool`, *optional*): Whether every rank sees `output_dir`'s filesystem; detected when
            `None`.

    Returns:
        `Path` or `None`: the folder on the main process, `None` on other ranks.

    Raises:
        `CheckpointError`: the model is sharded and its `save_pretrained` ignores `state_dict` (it would write
            the model's own weights), or another rank failed.
        `CheckpointWriteError`: the system refused a write (a full disk, no permission); the message names the
            folder and says that nothing was replaced.
    """
    check_size("max_shard_size", max_shard_size, optional=True)
    check_optional_bool("shared_filesystem", shared_filesystem)
    output_dir = Path(output_dir)
    ema.wait()
    ranks = Ranks(ema.layout)
    module = ema.layout.save_module(ema.model)
    if max_shard_size is None:
        max_shard_size = default_max_shard_size(module)
    existed = output_dir.is_dir()
    try:
        with contextlib.ExitStack() as staging:
            # The main process builds the folder under a temporary name; any error removes it, the commit renames it.
            tmp = ranks.on_main(f"write `{output_dir}`", lambda: str(staging.enter_context(atomic_folder(output_dir))))
            job = SaveJob(ema, SaveSources(ema), module, Path(tmp), ranks, output_dir, max_shard_size)
            plan = plan_save(job, processing_class)
            write_parts(job, plan, shared_filesystem)
            ranks.on_main(f"commit `{output_dir}`", lambda: commit(job, plan, extra_state, staging))
    except OSError as err:
        if isinstance(err, CheckpointWriteError):
            raise
        raise _write_error(output_dir, err, existed) from err
    return output_dir if ranks.main else None


def _write_error(output_dir: Path, err: OSError, existed: bool) -> CheckpointWriteError:
    kept = f"the previous `{output_dir}` is intact" if existed else f"nothing was left at `{output_dir}`"
    error = CheckpointWriteError(
        f"could not write the EMA to `{output_dir}`: {err}; {kept} (the write goes to a temporary folder, renamed "
        f"into place only when complete) and every `ema/` saved before is as it was"
    )
    error.errno = err.errno
    return error

"""`swap_at_end`: make the EMA the final model, so `trainer.save_model()` / `push_to_hub()` publish it.

The raw weights are written to `output_dir/raw/` first (atomically, `save_pretrained` plus the tokenizer), then the
EMA is copied into the model's own tensors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..ema_folder import EMA_DIRNAME, STATE_NAME, atomic_folder, load_ema
from ..utils.output import mark_output, prepare_output

__all__ = ["RAW_DIRNAME", "check_raw_folder", "make_ema_final"]

logger = logging.getLogger(__name__)

RAW_DIRNAME = "raw"


def check_raw_folder(output_dir: str | os.PathLike) -> Path:
    """Check that `output_dir/raw/` may be written: absent, empty, or an earlier `raw/` hf-ema wrote (its marker).

    A `raw/` folder hf-ema did not write is never replaced. Cheap (a few `stat` calls): call it when training starts
    so the conflict shows before any step is trained.

    Args:
        output_dir (`str` or `os.PathLike`): The run folder.

    Returns:
        `Path`: the `raw/` folder.

    Raises:
        `OutputFolderError`: naming the folder.
    """
    return prepare_output(
        Path(output_dir) / RAW_DIRNAME, overwrite=True, what="the raw-weights folder of `output_dir`"
    )


def make_ema_final(
    ema,
    output_dir: str | os.PathLike,
    processing_class: Any | None = None,
    best_checkpoint: str | os.PathLike | None = None,
) -> Path | None:
    """Save the model's raw weights to `output_dir/raw/`, then copy the EMA into the model.

    An existing `raw/` is replaced only when hf-ema wrote it (see [`check_raw_folder`]); otherwise nothing is changed
    and an `OutputFolderError` is raised before the model or any file is touched.

    Every rank calls it: the raw weights of a sharded model are gathered, and the EMA is copied into each rank's
    local shard.

    Args:
        ema (`ModelEMA`): The EMA; `ema.model` is the model that receives it.
        output_dir (`str` or `os.PathLike`): The run folder; the raw weights go to its `raw/` subfolder.
        processing_class (*optional*): Tokenizer / processor saved beside the raw weights.
        best_checkpoint (`str` or `os.PathLike`, *optional*): A checkpoint folder whose `ema/` should become the
            final model instead of the current EMA (used with `load_best_model_at_end`, where the model holds that
            checkpoint's raw weights). Ignored, with a warning, when it has no `ema/`.

    Returns:
        `Path` or `None`: the `raw/` folder on the main process, `None` elsewhere.
    """
    # Every rank checks before the first collective, so a refusal cannot leave the other ranks waiting.
    raw_dir = check_raw_folder(output_dir)
    path = None
    layout = ema.layout
    # A model sharded by FSDP / ZeRO-3 needs its full tensors gathered (a collective); a replicated one does not.
    model_sharded = layout.kind not in ("replicated", "ddp_sharded")
    full = layout.full_model_tensors(ema.model, skip=set()) if model_sharded else None
    if layout.is_main_process():
        with atomic_folder(raw_dir) as tmp:
            mark_output(tmp, "raw")
            module = layout.save_module(ema.model)
            if full is not None:
                # Through the layout: under FSDP1 it fixes the adapter key names PEFT would get wrong.
                layout.save_pretrained(module, tmp, full)
            else:
                module.save_pretrained(tmp)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)
        path = raw_dir
    layout.barrier()
    if best_checkpoint is not None:
        folder = Path(best_checkpoint) / EMA_DIRNAME
        if (folder / STATE_NAME).is_file():
            load_ema(ema, folder)
            logger.info("swap_at_end: the final model is the EMA of the best checkpoint %s", best_checkpoint)
        else:
            logger.warning("swap_at_end: %s has no EMA; the final model is the last EMA", best_checkpoint)
    ema.copy_to()
    return path

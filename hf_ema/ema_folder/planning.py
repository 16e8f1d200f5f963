"""Planning a save: the main process decides how the weights are written and creates the files hf-ema lays out
itself; every rank then holds the same [`SavePlan`]."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from ..config import CONFIG_NAME
from ..errors import CheckpointError
from ..sharding.base import ShardedLayoutBase
from .files import WeightsFiles, own_keys, plan_direct
from .library import library_writes, passes_state_dict, placeholder_keys, shards_files
from .plan import LibraryWrites, SaveJob, SavePlan, decode_layout, encode_layout

__all__ = ["plan_save"]

logger = logging.getLogger(__name__)


def plan_save(job: SaveJob, processing_class: Any | None = None) -> SavePlan:
    """The plan of a save, on every rank (a collective call).

    The main process writes the tokenizer and `ema_config.json`, and creates the weights files at their final size
    when hf-ema can lay them out (it knows the keys the library writes). Otherwise the library writes the weights
    itself now, with the EMA swapped in or gathered, and the plan holds the exact copy only.

    Args:
        job (`SaveJob`): The save.
        processing_class (*optional*): A tokenizer / processor saved alongside.
    """
    first = job.ranks.on_main(f"write `{job.output_dir}`", lambda: encode_layout(_lay_out(job, processing_class)))
    choice = decode_layout(first)
    if isinstance(choice, LibraryWrites):
        return library_writes(job, choice)
    return choice


def _lay_out(job: SaveJob, processing_class: Any | None) -> SavePlan | LibraryWrites:
    """On the main process: the files hf-ema writes itself, or how the library must write the weights."""
    if processing_class is not None:
        processing_class.save_pretrained(job.folder)
    job.ema.config.to_json_file(job.folder / CONFIG_NAME)
    module, layout = job.module, job.ema.layout
    sharded = isinstance(layout, ShardedLayoutBase)
    if not hasattr(module, "save_pretrained"):
        return plan_direct(job, own_keys(job.sources, sharded), WeightsFiles("model.safetensors"), job.max_shard_size)
    passes = passes_state_dict(module)
    if passes:
        plan = _plan_from_placeholders(job)
        if plan is not None:
            return plan
        logger.info(
            "%s.save_pretrained transforms the tensors it saves: it writes the EMA itself", type(module).__name__
        )
    if not sharded:
        return LibraryWrites.SWAPPED
    if not passes:
        raise CheckpointError(
            f"cannot save the EMA of this {layout.kind}-sharded {type(module).__name__}: its `save_pretrained` "
            f"ignores the `state_dict` it is given and would write the model's own weights instead of the EMA"
        )
    return LibraryWrites.GATHERED


def _plan_from_placeholders(job: SaveJob) -> SavePlan | None:
    """The plan of a direct write of the keys the library writes (see `placeholder_keys`), with the library's
    other files (`config.json`, `adapter_config.json`, ...) moved into the folder; `None` when it cannot be made."""
    scratch = job.folder / ".layout"
    scratch.mkdir()
    try:
        found = placeholder_keys(job, scratch)
        if found is None:
            return None
        for path in scratch.iterdir():
            os.replace(path, job.folder / path.name)
        split = job.max_shard_size if shards_files(job.module) else None  # a PEFT adapter is always one file
        return plan_direct(job, *found, split)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

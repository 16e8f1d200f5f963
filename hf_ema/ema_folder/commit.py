"""The commit of a save: `ema_state.json`, the last file written, then the rename of the finished folder into place
(leaving the `atomic_folder`), on the main process."""

from __future__ import annotations

import contextlib
from typing import Any

from .._version import __version__
from ..utils.jsonio import write_json
from ..utils.paths import STATE_NAME
from .plan import SaveJob, SavePlan
from .sources import THETA0_PREFIX

__all__ = ["FORMAT_VERSION", "commit"]

#: Layout of the `ema/` folder (docs/reference/ema_format.md). 1: the main process wrote the weights from a gathered
#: EMA, and each rank its own shards to `shards/`. 2: every rank writes its part of each weights file in place, and
#: `ema_state.json` maps each EMA tensor to the file and key that hold it exactly.
FORMAT_VERSION = 2


def ema_state(job: SaveJob, plan: SavePlan, extra_state: dict[str, Any] | None) -> dict[str, Any]:
    """The content of `ema_state.json`: the counters, the config, the layout and where each tensor is stored.

    Args:
        job (`SaveJob`): The save.
        plan (`SavePlan`): Its plan.
        extra_state (`dict`, *optional*): More entries.
    """
    ema = job.ema
    tensors = list(ema.named_tensors())
    meta = {
        "format_version": FORMAT_VERSION,
        "hf_ema_version": __version__,
        "step": ema.step,
        **ema.counter_state(),
        "config": ema.config.to_dict(),
        "config_history": ema.config_history,
        "layout": ema.layout.kind,
        "world_size": ema.layout.world_size,
        "exact_tensors": plan.exact_tensors,
        "names": [t.name for t in tensors if t.averaged],
        "copied_names": [t.name for t in tensors if not t.averaged],
        "tensors": {
            name: {"file": loc.file, "key": loc.key}
            for name, loc in plan.locations.items()
            if not name.startswith(THETA0_PREFIX)
        },
    }
    theta0 = {k.removeprefix(THETA0_PREFIX): v for k, v in plan.locations.items() if k.startswith(THETA0_PREFIX)}
    if plan.weights:  # where the loadable weights hold each averaged tensor (under the library's keys)
        meta["weights"] = {name: {"file": loc.file, "key": loc.key} for name, loc in plan.weights.items()}
    if theta0:  # BEMA's snapshot, where its part of every rank is stored
        meta["bema_theta0"] = {name: {"file": loc.file, "key": loc.key} for name, loc in theta0.items()}
    if extra_state:
        meta.update(extra_state)
    return meta


def commit(job: SaveJob, plan: SavePlan, extra_state: dict[str, Any] | None, staging: contextlib.ExitStack) -> bool:
    """On the main process, once every rank wrote its parts: write `ema_state.json`, then leave the folder's
    `atomic_folder` (held by `staging`), which renames it into place.

    Args:
        job (`SaveJob`): The save.
        plan (`SavePlan`): Its plan.
        extra_state (`dict`, *optional*): More entries for `ema_state.json`.
        staging (`contextlib.ExitStack`): The stack that entered the folder's `atomic_folder`.
    """
    write_json(job.folder / STATE_NAME, ema_state(job, plan, extra_state))
    staging.close()
    return True

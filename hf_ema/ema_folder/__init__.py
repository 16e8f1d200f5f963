"""Writing and reading an `ema/` folder: `save_pretrained`-style weights plus the EMA state, written atomically.

A save reads top-down: [`plan_save`] (the main process lays out the files, or the library writes the weights) ->
[`write_parts`] (every rank writes its part of every tensor in place) -> [`commit`] (`ema_state.json`, then the
rename into place). The modules: `sources` (what a save reads), `plan` (the typed plan), `files` (the files hf-ema
lays out), `library` (the library's `save_pretrained`), `planning`, `parts`, `commit`, `save`; `load` and `format1`
(the legacy reader) read folders back.
"""

from ..utils.atomic import atomic_folder
from ..utils.paths import EMA_DIRNAME, STATE_NAME, TENSORS_NAME
from .commit import FORMAT_VERSION
from .load import load_ema, read_ema_state
from .save import save_ema

__all__ = [
    "EMA_DIRNAME",
    "FORMAT_VERSION",
    "STATE_NAME",
    "TENSORS_NAME",
    "atomic_folder",
    "load_ema",
    "read_ema_state",
    "save_ema",
]

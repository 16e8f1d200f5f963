"""The C compiler the native CPU kernel is built with (`hf_ema.engine.native`), found without importing torch so that
`hf-ema env` can name it in a fraction of a second."""

from __future__ import annotations

import os
import shutil

__all__ = ["c_compiler"]


def c_compiler() -> str | None:
    """The C compiler the kernel is built with: `$CC` when set, else the first of `cc`, `gcc`, `clang` on the
    `PATH`; `None` when there is none."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path is not None:
            return path
    return None

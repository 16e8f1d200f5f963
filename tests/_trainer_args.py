"""The `TrainingArguments` that every test's real `Trainer` run shares: CPU, no reporting, no progress bars, seed 0."""

from __future__ import annotations

import os
from typing import Any


def cpu_args(output_dir: str | os.PathLike, **overrides: Any):
    """`TrainingArguments(output_dir, use_cpu=True, report_to=[], disable_tqdm=True, seed=0, **overrides)`.

    Args:
        output_dir (`str` or `os.PathLike`): The run folder.
        **overrides: Any other `TrainingArguments` field (these four included).
    """
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(output_dir=str(output_dir), report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)

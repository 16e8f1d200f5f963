"""Post-hoc EMA (EDM2, Karras et al. 2024): keep two power-function EMAs during training, snapshot them, and
reconstruct the EMA of any width `sigma_rel` after training by least squares.

Where things live in a `Trainer` run (`output_dir` is `TrainingArguments.output_dir`):

- `output_dir/ema_posthoc/step-<N>/sigma_rel-<s>/`: the snapshots, one `save_ema` folder per profile (weights in
  `save_pretrained` format, `ema_state.json` with the step, `t`, `gamma` and update interval). They sit in the run
  folder, not in `checkpoint-N/`, so `save_total_limit` rotation never deletes them: the reconstruction needs the
  whole history.
- `checkpoint-N/ema_posthoc/sigma_rel-<s>/`: the current state of each power-function EMA, to resume training from
  that checkpoint (rotated with the checkpoint, which is right: it is only needed to resume from there).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import EMAConfig
from ..decay import check_sigma_rel
from ..ema_folder import EMA_DIRNAME, STATE_NAME, load_ema, save_ema
from ..errors import ConfigError, ConfigTypeError
from ..model_ema import ModelEMA
from ..utils.jsonio import write_json
from ..utils.paths import POSTHOC_DIRNAME, posthoc_step
from ..utils.validation import check_int, coerce_config

__all__ = [
    "POSTHOC_DIRNAME",
    "PostHocConfig",
    "PostHocEMA",
    "resolve_posthoc",
]

logger = logging.getLogger(__name__)


@dataclass
class PostHocConfig:
    """What `EMACallback(posthoc=...)` keeps for a post-hoc EMA.

    Args:
        sigma_rels (`Sequence[float]`, *optional*, defaults to `(0.05, 0.10)`): Relative widths of the power-function
            EMAs tracked during training (EDM2's defaults), each in (0, 0.2887). Each one costs a copy of the
            averaged weights in the EMA dtype (fp32 by default) and one `save_pretrained` folder per snapshot.
        snapshot_every (`int`, *optional*): Snapshot every this many optimizer steps. `None` (default) snapshots at
            every checkpoint save (`save_steps`). A final snapshot is always taken when training ends.
        update_every (`int`, *optional*, defaults to 1): Update the power-function EMAs every this many optimizer
            steps; the reconstruction accounts for it.
    """

    sigma_rels: Sequence[float] = (0.05, 0.10)
    snapshot_every: int | None = None
    update_every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.sigma_rels, (int, float)) or not isinstance(self.sigma_rels, (list, tuple)):
            raise ConfigTypeError(f"`sigma_rels` must be a list of numbers, got {self.sigma_rels!r}")
        if len(self.sigma_rels) == 0 or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError(f"`sigma_rels` must hold at least one value and no duplicates, got {self.sigma_rels!r}")
        for s in self.sigma_rels:
            check_sigma_rel("`sigma_rels` entries", s)
        self.sigma_rels = tuple(float(s) for s in self.sigma_rels)
        if self.snapshot_every is not None:
            check_int("snapshot_every", self.snapshot_every, minimum=1)
        check_int("update_every", self.update_every, minimum=1)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "update_every": self.update_every,
        }


def resolve_posthoc(posthoc: bool | dict | PostHocConfig | None) -> PostHocConfig | None:
    """Turn the `posthoc=` argument of `EMACallback` into a `PostHocConfig` (or `None` when off).

    Args:
        posthoc (`bool`, `dict` or `PostHocConfig`, *optional*): `True` for the defaults, a dict of
            `PostHocConfig` fields, a `PostHocConfig`, or `None` / `False` for no post-hoc EMA.
    """
    return coerce_config("posthoc", posthoc, PostHocConfig)


def _profile_dirname(sigma_rel: float) -> str:
    return f"sigma_rel-{sigma_rel:g}"


class PostHocEMA:
    """Power-function EMAs of a model, snapshotted for a post-hoc reconstruction.

    Usable in any training loop; `EMACallback(posthoc=...)` drives it in a `Trainer`.

    ```python
    phema = PostHocEMA(model)
    for step, batch in enumerate(loader, start=1):
        ...
        optimizer.step()
        phema.update(step)
        if step % 1000 == 0:
            phema.snapshot("run/ema_posthoc")  # a collective call under torch.distributed
    reconstruct("run", sigma_rel=0.08, out_dir="run/ema-0.08")
    ```

    Args:
        model (`nn.Module`): The model.
        config (`PostHocConfig`, *optional*): The profiles and intervals; defaults to `PostHocConfig()`.
        base (`EMAConfig`, *optional*): The main EMA's config, from which the tensor selection (`trainable_only`,
            `include`, `exclude`, `include_buffers`), `dtype`, `device`, `start_step` and the sharding options are
            taken.
    """

    def __init__(self, model: nn.Module, config: PostHocConfig | None = None, base: EMAConfig | None = None) -> None:
        self.config = config if config is not None else PostHocConfig()
        base = base if base is not None else EMAConfig()
        self.emas: list[ModelEMA] = [
            # Everything but the horizon (tensor selection, dtype, device, sharding, ...) follows the main EMA.
            ModelEMA(
                model,
                dataclasses.replace(
                    base, decay=None, half_life=None, sigma_rel=s, warmup=False, update_every=self.config.update_every
                ),
            )
            for s in self.config.sigma_rels
        ]
        self.last_snapshot_step: int | None = None
        self.enabled = True

    @property
    def step(self) -> int:
        """The last optimizer step seen."""
        return self.emas[0].step

    @step.setter
    def step(self, value: int) -> None:
        for ema in self.emas:
            ema.step = value

    def update(self, step: int | None = None) -> None:
        """Fold the current weights into every power-function EMA. Call once per optimizer step.

        Args:
            step (`int`, *optional*): The optimizer step just completed.
        """
        for ema in self.emas:
            ema.update(step=step)

    def snapshot(self, root: str | os.PathLike, processing_class: Any | None = None) -> Path | None:
        """Write the current profiles to `root/step-<N>/` (a collective call under `torch.distributed`).

        Nothing is written before the first update (the profiles are empty then).

        Args:
            root (`str` or `os.PathLike`): The snapshot folder, e.g. `output_dir/ema_posthoc`.
            processing_class (*optional*): Tokenizer saved beside the weights (not needed for `reconstruct`).

        Returns:
            `Path` or `None`: the `step-<N>` folder on the main process.
        """
        if not self.enabled or self.emas[0].num_updates == 0:
            return None
        step = self.step
        folder = Path(root) / f"step-{step:09d}"
        for ema, sigma_rel in zip(self.emas, self.config.sigma_rels):
            # t is the time of the last update, in steps since the EMA started: the profile ends there.
            extra = {
                "posthoc": {
                    # From the step, not the update count: a skipped (non-finite) update leaves the profile's time axis.
                    "t": max(0, ema.step - ema.config.start_step) // ema.config.update_every * ema.config.update_every,
                    "gamma": ema.config.gamma,
                    "sigma_rel": sigma_rel,
                    "update_every": ema.config.update_every,
                    "start_step": ema.config.start_step,
                    "global_step": step,
                }
            }
            save_ema(ema, folder / _profile_dirname(sigma_rel), processing_class=processing_class, extra_state=extra)
        self.last_snapshot_step = step
        return folder if self.emas[0].layout.is_main_process() else None

    def save_state(self, folder: str | os.PathLike) -> None:
        """Write the EMAs' current state (for resuming) to `folder/sigma_rel-<s>/`. A collective call.

        Args:
            folder (`str` or `os.PathLike`): E.g. `checkpoint-N/ema_posthoc`.
        """
        if not self.enabled:
            return
        for ema, sigma_rel in zip(self.emas, self.config.sigma_rels):
            save_ema(ema, Path(folder) / _profile_dirname(sigma_rel))

    def load_state(self, folder: str | os.PathLike, allow_config_change: bool = False) -> bool:
        """Restore the EMAs from `save_state` output; returns whether every profile was found.

        Args:
            folder (`str` or `os.PathLike`): E.g. `checkpoint-N/ema_posthoc`.
            allow_config_change (`bool`, *optional*, defaults to `False`): See [`load_ema`].
        """
        folders = [Path(folder) / _profile_dirname(s) for s in self.config.sigma_rels]
        if not all((f / STATE_NAME).is_file() for f in folders):
            return False
        for ema, f in zip(self.emas, folders):
            load_ema(ema, f, allow_config_change=allow_config_change)
        return True

    # ------------------------------------------------------------------ Trainer events (called by EMACallback)
    def on_train_begin(
        self, args: Any, state: Any, resume_candidates: Sequence[Path], allow_config_change: bool = False
    ) -> None:
        """Start at the Trainer's step and, when resuming, restore from the checkpoint.

        Args:
            args (`TrainingArguments`): The training arguments.
            state (`TrainerState`): The trainer state.
            resume_candidates (`Sequence[Path]`): Checkpoint folders (or their `ema/`) to restore from, in order.
            allow_config_change (`bool`, *optional*, defaults to `False`): See [`load_ema`].
        """
        self.step = state.global_step
        root = Path(args.output_dir) / POSTHOC_DIRNAME
        main = self.emas[0].layout.is_main_process()
        if state.global_step == 0:
            if main:
                if root.is_dir() and any(posthoc_step(p) is not None for p in root.iterdir()):
                    # Snapshots of an earlier run in the same output_dir would corrupt this run's reconstruction;
                    # move them aside rather than delete them.
                    aside = root.with_name(f"{POSTHOC_DIRNAME}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
                    logger.warning("fresh run: moving the earlier post-hoc snapshots in %s to %s", root, aside)
                    os.replace(root, aside)
                root.mkdir(parents=True, exist_ok=True)
                write_json(root / "posthoc_config.json", self.config.to_dict())
            return
        for candidate in resume_candidates:
            base = candidate.parent if candidate.name == EMA_DIRNAME else candidate
            if self.load_state(base / POSTHOC_DIRNAME, allow_config_change):
                logger.info("post-hoc EMAs restored from %s", base / POSTHOC_DIRNAME)
                break
        else:
            # Restarting the power-function EMAs mid-run would break their profile: stop snapshotting instead.
            logger.warning(
                "Resuming at step %s without a post-hoc EMA state in the checkpoint: no more post-hoc snapshots.",
                state.global_step,
            )
            self.enabled = False
            return
        if main and root.is_dir():
            # Snapshots newer than the resume step come from the abandoned continuation of the run.
            for path in root.iterdir():
                step = posthoc_step(path)
                if step is not None and step > state.global_step:
                    logger.warning("removing post-hoc snapshot %s, newer than the resume step", path)
                    shutil.rmtree(path, ignore_errors=True)

    def on_step_end(self, args: Any, state: Any) -> None:
        """Update, and snapshot every `snapshot_every` steps."""
        self.update(step=state.global_step)
        every = self.config.snapshot_every
        if every is not None and state.global_step % every == 0:
            self.snapshot(Path(args.output_dir) / POSTHOC_DIRNAME)

    def on_save(self, args: Any, state: Any, checkpoint_folder: Path) -> None:
        """Save the resume state into the checkpoint, and snapshot when `snapshot_every` is `None`."""
        if not self.enabled:
            return
        if self.config.snapshot_every is None and self.last_snapshot_step != state.global_step:
            self.snapshot(Path(args.output_dir) / POSTHOC_DIRNAME)
        self.save_state(checkpoint_folder / POSTHOC_DIRNAME)

    def on_train_end(self, args: Any, state: Any) -> None:
        """Take the final snapshot (unless one was taken at this step)."""
        if self.last_snapshot_step != state.global_step:
            self.snapshot(Path(args.output_dir) / POSTHOC_DIRNAME)

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
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import MAX_SIGMA_REL, EMAConfig
from .errors import CheckpointError, ConfigError, ConfigTypeError
from .model_ema import ModelEMA
from .phema import solve_posthoc_weights
from .schedules import gamma_from_sigma_rel, sigma_rel_from_gamma
from .serialization import EMA_DIRNAME, STATE_NAME, atomic_folder, load_ema, read_ema_state, save_ema
from .weight_files import check_compatible, copy_metadata, read_weight_folder, write_weighted_sum

__all__ = [
    "POSTHOC_DIRNAME",
    "RECIPE_NAME",
    "PostHocConfig",
    "PostHocEMA",
    "Snapshot",
    "list_snapshots",
    "reconstruct",
    "resolve_posthoc",
]

logger = logging.getLogger(__name__)

POSTHOC_DIRNAME = "ema_posthoc"
RECIPE_NAME = "posthoc_recipe.json"
_STEP_DIR = re.compile(r"step-(\d+)")


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
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < MAX_SIGMA_REL:
                raise ConfigError(f"`sigma_rels` entries must be in (0, {MAX_SIGMA_REL:.4f}), got {s!r}")
        self.sigma_rels = tuple(float(s) for s in self.sigma_rels)
        if self.snapshot_every is not None and (
            isinstance(self.snapshot_every, bool)
            or not isinstance(self.snapshot_every, int)
            or self.snapshot_every < 1
        ):
            raise ConfigError(f"`snapshot_every` must be None or an int >= 1, got {self.snapshot_every!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ConfigError(f"`update_every` must be an int >= 1, got {self.update_every!r}")

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
    if posthoc is None or posthoc is False:
        return None
    if posthoc is True:
        return PostHocConfig()
    if isinstance(posthoc, PostHocConfig):
        return posthoc
    if isinstance(posthoc, dict):
        return PostHocConfig(**posthoc)
    raise ConfigTypeError(f"`posthoc` must be a bool, a dict or a PostHocConfig, got {posthoc!r}")


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
                    "t": ema.num_updates * ema.config.update_every,
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

    def load_state(self, folder: str | os.PathLike) -> bool:
        """Restore the EMAs from `save_state` output; returns whether every profile was found.

        Args:
            folder (`str` or `os.PathLike`): E.g. `checkpoint-N/ema_posthoc`.
        """
        folders = [Path(folder) / _profile_dirname(s) for s in self.config.sigma_rels]
        if not all((f / STATE_NAME).is_file() for f in folders):
            return False
        for ema, f in zip(self.emas, folders):
            load_ema(ema, f)
        return True

    # ------------------------------------------------------------------ Trainer events (called by EMACallback)
    def on_train_begin(self, args: Any, state: Any, resume_candidates: Sequence[Path]) -> None:
        """Start at the Trainer's step and, when resuming, restore from the checkpoint.

        Args:
            args (`TrainingArguments`): The training arguments.
            state (`TrainerState`): The trainer state.
            resume_candidates (`Sequence[Path]`): Checkpoint folders (or their `ema/`) to restore from, in order.
        """
        self.step = state.global_step
        root = Path(args.output_dir) / POSTHOC_DIRNAME
        main = self.emas[0].layout.is_main_process()
        if state.global_step == 0:
            if main:
                if root.is_dir() and any(_STEP_DIR.fullmatch(p.name) for p in root.iterdir()):
                    # Snapshots of an earlier run in the same output_dir would corrupt this run's reconstruction;
                    # move them aside rather than delete them.
                    aside = root.with_name(f"{POSTHOC_DIRNAME}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
                    logger.warning("fresh run: moving the earlier post-hoc snapshots in %s to %s", root, aside)
                    os.replace(root, aside)
                root.mkdir(parents=True, exist_ok=True)
                with open(root / "posthoc_config.json", "w", encoding="utf-8") as f:
                    json.dump(self.config.to_dict(), f, indent=2)
                    f.write("\n")
            return
        for candidate in resume_candidates:
            base = candidate.parent if candidate.name == EMA_DIRNAME else candidate
            if self.load_state(base / POSTHOC_DIRNAME):
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
                match = _STEP_DIR.fullmatch(path.name)
                if match and int(match.group(1)) > state.global_step:
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


# ---------------------------------------------------------------------- reconstruction
@dataclass
class Snapshot:
    """One stored power-function EMA snapshot.

    Args:
        folder (`Path`): Its `save_ema` folder.
        step (`int`): The optimizer step it was taken at.
        t (`int`): Time of its last update, in steps since the EMA started.
        gamma (`float`): Exponent of its profile.
        update_every (`int`): Steps between two updates.
    """

    folder: Path
    step: int
    t: int
    gamma: float
    update_every: int


def _posthoc_root(run_dir: Path) -> Path:
    if run_dir.name == POSTHOC_DIRNAME or any(_STEP_DIR.fullmatch(p.name) for p in run_dir.iterdir()):
        return run_dir
    return run_dir / POSTHOC_DIRNAME


def list_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """The post-hoc snapshots of a run, oldest first.

    Args:
        run_dir (`str` or `os.PathLike`): The run's `output_dir` (or its `ema_posthoc/` folder).

    Raises:
        `CheckpointError`: when the folder holds no snapshot.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"`run_dir` `{run_dir}` does not exist")
    root = _posthoc_root(run_dir)
    out: list[Snapshot] = []
    if root.is_dir():
        for step_dir in sorted(root.iterdir()):
            if not (step_dir.is_dir() and _STEP_DIR.fullmatch(step_dir.name)):
                continue
            for folder in sorted(step_dir.iterdir()):
                if not (folder / STATE_NAME).is_file():
                    continue
                meta = read_ema_state(folder).get("posthoc")
                if not meta:
                    continue
                out.append(
                    Snapshot(
                        folder,
                        int(meta["global_step"]),
                        int(meta["t"]),
                        float(meta["gamma"]),
                        int(meta["update_every"]),
                    )
                )
    if not out:
        raise CheckpointError(
            f"`{run_dir}` holds no post-hoc EMA snapshots (expected `{POSTHOC_DIRNAME}/step-N/sigma_rel-S/`); "
            f"train with EMACallback(posthoc=True)"
        )
    out.sort(key=lambda s: (s.t, s.gamma))
    return out


def _metadata_sources(run_dir: Path, newest: Path) -> list[Path]:
    # The snapshot has config.json / adapter_config.json; the tokenizer is in the run's ema/, the run root (after
    # trainer.save_model) or the newest checkpoint.
    root = run_dir.parent if run_dir.name == POSTHOC_DIRNAME else run_dir
    checkpoints = sorted(
        (p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return [newest, root / EMA_DIRNAME, root] + ([checkpoints[-1]] if checkpoints else [])


def reconstruct(
    run_dir: str | os.PathLike,
    sigma_rel: float | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    gamma: float | None = None,
    step: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Reconstruct the power-function EMA of width `sigma_rel` from a run's post-hoc snapshots.

    Finds the weights `x` that best fit the wanted profile with the stored ones (least squares over the profiles,
    with the update interval accounted for; see `hf_ema.phema`), then writes `sum_i x_i * snapshot_i`, streamed
    tensor by tensor, as a `from_pretrained`-loadable folder with configs and tokenizer copied from the run and
    the recipe (coefficients, fit error) in `posthoc_recipe.json`.

    Args:
        run_dir (`str` or `os.PathLike`): The run's `output_dir` (or its `ema_posthoc/` folder).
        sigma_rel (`float`, *optional*): Wanted relative width, in (0, 0.2887). Give this or `gamma`.
        out_dir (`str` or `os.PathLike`, *optional*): Output folder; defaults to `run_dir/ema-sigma_rel-<s>`.
        gamma (`float`, *optional*): Wanted profile exponent instead of `sigma_rel`.
        step (`int`, *optional*): Optimizer step of the wanted EMA; defaults to the last snapshot's.
        overwrite (`bool`, *optional*, defaults to `False`): Replace `out_dir` if it exists.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `Path`: the output folder.
    """
    if (sigma_rel is None) == (gamma is None):
        raise ConfigError(f"give exactly one of `sigma_rel` and `gamma`, got sigma_rel={sigma_rel!r}, gamma={gamma!r}")
    if sigma_rel is not None:
        if (
            isinstance(sigma_rel, bool)
            or not isinstance(sigma_rel, (int, float))
            or not 0.0 < sigma_rel < MAX_SIGMA_REL
        ):
            raise ConfigError(f"`sigma_rel` must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel!r}")
        gamma = gamma_from_sigma_rel(float(sigma_rel))
    elif isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > -1.0:
        raise ConfigError(f"`gamma` must be a number > -1, got {gamma!r}")
    else:
        sigma_rel = sigma_rel_from_gamma(float(gamma))
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    intervals = sorted({s.update_every for s in snapshots})
    if len(intervals) != 1:
        raise CheckpointError(f"snapshots in `{run_dir}` mix update intervals {intervals!r}; reconstruct needs one")
    k = intervals[0]
    offset = {s.step - s.t for s in snapshots}  # the EMAs' start step
    last = max(snapshots, key=lambda s: s.t)
    if step is None:
        t_target = last.t
        step = last.step
    else:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ConfigTypeError(f"`step` must be an int, got {step!r}")
        start = min(offset)
        # The EMA at `step` is the one after the last update at or before it.
        t_target = ((step - start) // k) * k
        if not 0 < t_target <= last.t:
            raise ConfigError(f"`step` must be within the snapshots' range ({start + k}..{last.step}), got {step!r}")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / f"ema-sigma_rel-{sigma_rel:g}"
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"`out_dir` `{out_dir}` exists and is not empty; pass overwrite=True to replace it")

    x, fit_error = solve_posthoc_weights([s.t for s in snapshots], [s.gamma for s in snapshots], t_target, gamma, k)
    folders = [read_weight_folder(s.folder) for s in snapshots]
    # The newest snapshot is the layout reference (write_weighted_sum and check_compatible use the last one).
    newest_index = snapshots.index(last)
    order = [i for i in range(len(snapshots)) if i != newest_index] + [newest_index]
    folders = [folders[i] for i in order]
    coefficients = [float(x[i]) for i in order]
    check_compatible(folders)
    if fit_error > 0.05:
        logger.warning("post-hoc fit of sigma_rel=%g is poor (relative profile error %.3f)", sigma_rel, fit_error)

    from . import __version__

    recipe = {
        "sigma_rel": sigma_rel,
        "gamma": gamma,
        "step": step,
        "t": t_target,
        "update_every": k,
        "relative_profile_error": fit_error,
        "snapshots": [
            {"path": str(s.folder), "step": s.step, "t": s.t, "gamma": s.gamma, "weight": float(w)}
            for s, w in zip(snapshots, x)
        ],
        "hf_ema_version": __version__,
    }
    with atomic_folder(out_dir) as tmp:
        write_weighted_sum(folders, coefficients, tmp, progress=progress, desc="post-hoc EMA")
        copy_metadata(tmp, _metadata_sources(run_dir, last.folder))
        with open(tmp / RECIPE_NAME, "w", encoding="utf-8") as f:
            json.dump(recipe, f, indent=2)
            f.write("\n")
    logger.info("post-hoc EMA sigma_rel=%g written to %s (profile fit error %.2e)", sigma_rel, out_dir, fit_error)
    return out_dir

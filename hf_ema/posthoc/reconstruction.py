"""Post-hoc EMA reconstruction (EDM2, Karras et al. 2024, section 3.2): the EMA of any width `sigma_rel`, built after
training as a least-squares combination of the stored power-function EMA snapshots (see `profiles.py`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..decay import check_sigma_rel, gamma_from_sigma_rel, sigma_rel_from_gamma
from ..ema_folder import EMA_DIRNAME, STATE_NAME, atomic_folder, read_ema_state
from ..errors import CheckpointError, ConfigError
from ..utils.jsonio import write_json
from ..utils.output import mark_output, prepare_output
from ..utils.paths import POSTHOC_DIRNAME, posthoc_step
from ..utils.validation import check_int, is_number
from ..weighted_sum import check_compatible, copy_metadata, read_weight_folder, write_weighted_sum
from .profiles import solve_posthoc_weights

__all__ = ["RECIPE_NAME", "Snapshot", "describe_snapshots", "list_snapshots", "reconstruct"]

logger = logging.getLogger(__name__)

RECIPE_NAME = "posthoc_recipe.json"


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

    @property
    def sigma_rel(self) -> float:
        """The relative width of its profile (from `gamma`)."""
        return sigma_rel_from_gamma(self.gamma)


def describe_snapshots(snapshots: Iterable[tuple[int, float]]) -> str:
    """How the CLI and the app name a set of snapshots: `"12 snapshots (sigma_rel 0.05 and 0.1 at 6 steps,
    100–600)"`. One snapshot is one stored EMA: one width at one step.

    Args:
        snapshots (`Iterable[tuple[int, float]]`): The `(step, sigma_rel)` of each snapshot, e.g.
            `[(s.step, s.sigma_rel) for s in list_snapshots(run)]`, or the `step` and `sigma_rel` of each entry of a
            recipe's `snapshots`.
    """
    pairs = list(snapshots)
    if not pairs:
        return "no snapshots"
    steps = sorted({int(step) for step, _ in pairs})
    widths = sorted({float(f"{sigma:.6g}") for _, sigma in pairs})
    width_text = " and ".join(f"{w:g}" for w in widths) if len(widths) <= 2 else ", ".join(f"{w:g}" for w in widths)
    step_text = f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps, {steps[0]}–{steps[-1]}"
    noun = "snapshot" if len(pairs) == 1 else "snapshots"
    return f"{len(pairs)} {noun} (sigma_rel {width_text} at {step_text})"


def _posthoc_root(run_dir: Path) -> Path:
    if run_dir.name == POSTHOC_DIRNAME or any(posthoc_step(p) is not None for p in run_dir.iterdir()):
        return run_dir
    return run_dir / POSTHOC_DIRNAME


def _run_root(run_dir: Path) -> Path:
    """The run folder around the snapshots (`run_dir` itself, or its parent when given `ema_posthoc/`)."""
    return run_dir.parent if _posthoc_root(run_dir) == run_dir else run_dir


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
            if not (step_dir.is_dir() and posthoc_step(step_dir) is not None):
                continue
            for folder in sorted(step_dir.iterdir()):
                if not (folder / STATE_NAME).is_file():
                    continue
                meta = read_ema_state(folder).get("posthoc")
                if not meta:
                    continue
                try:
                    snapshot = Snapshot(
                        folder,
                        int(meta["global_step"]),
                        int(meta["t"]),
                        float(meta["gamma"]),
                        int(meta["update_every"]),
                    )
                except (KeyError, TypeError, ValueError) as err:
                    raise CheckpointError(
                        f"`{folder / STATE_NAME}` is corrupt: its `posthoc` entry lacks or mangles {err}"
                    ) from None
                out.append(snapshot)
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
    root = _run_root(run_dir)
    checkpoints = sorted(
        (p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return [newest, root / EMA_DIRNAME, root] + ([checkpoints[-1]] if checkpoints else [])


def _target_width(sigma_rel: float | None, gamma: float | None) -> tuple[float, float]:
    """The wanted profile's `(sigma_rel, gamma)`, from exactly one of them (checked)."""
    if (sigma_rel is None) == (gamma is None):
        raise ConfigError(f"give exactly one of `sigma_rel` and `gamma`, got sigma_rel={sigma_rel!r}, gamma={gamma!r}")
    if sigma_rel is not None:
        target_gamma = gamma_from_sigma_rel(check_sigma_rel("`sigma_rel`", sigma_rel))
    elif gamma is None or not is_number(gamma) or not gamma > -1.0:
        raise ConfigError(f"`gamma` must be a number > -1, got {gamma!r}")
    else:
        target_gamma = float(gamma)
        sigma_rel = sigma_rel_from_gamma(target_gamma)
    return float(sigma_rel), target_gamma


def _target_time(run_dir: Path, snapshots: list[Snapshot], step: int | None) -> tuple[int, int, int]:
    """The snapshots' update interval `k`, and the wanted EMA's optimizer step and profile time `t` (checked)."""
    intervals = sorted({s.update_every for s in snapshots})
    if len(intervals) != 1:
        raise CheckpointError(f"snapshots in `{run_dir}` mix update intervals {intervals!r}; reconstruct needs one")
    k = intervals[0]
    offset = {s.step - s.t for s in snapshots}  # the EMAs' start step
    first = min(snapshots, key=lambda s: s.t)
    last = max(snapshots, key=lambda s: s.t)
    if step is None:
        t_target = last.t
        step = last.step
    else:
        check_int("step", step)
        # The EMA at `step` is the one after the last update at or before it.
        t_target = ((step - min(offset)) // k) * k
        if not first.t <= t_target <= last.t:
            raise ConfigError(
                f"`step` must be within the snapshots' range ({first.step}..{last.step}), got {step!r}: the EMA at a "
                "step is built from the snapshots taken at or before it"
            )
    return k, step, t_target


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
    with the update interval accounted for; see `hf_ema.posthoc.profiles`), then writes `sum_i x_i * snapshot_i`, streamed
    tensor by tensor, as a `from_pretrained`-loadable folder with configs and tokenizer copied from the run and
    the recipe (coefficients, fit error) in `posthoc_recipe.json`.

    Args:
        run_dir (`str` or `os.PathLike`): The run's `output_dir` (or its `ema_posthoc/` folder).
        sigma_rel (`float`, *optional*): Wanted relative width, in (0, 0.2887). Give this or `gamma`.
        out_dir (`str` or `os.PathLike`, *optional*): Output folder; defaults to `ema-sigma_rel-<s>` in the run
            folder. It may never be, contain or lie inside the snapshots, `ema/` or a checkpoint it reads, nor be a
            training run folder or a non-empty folder hf-ema did not write.
        gamma (`float`, *optional*): Wanted profile exponent instead of `sigma_rel`.
        step (`int`, *optional*): Optimizer step of the wanted EMA; defaults to the last snapshot's.
        overwrite (`bool`, *optional*, defaults to `False`): Replace `out_dir` if it exists and hf-ema wrote it.
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `Path`: the output folder.
    """
    sigma_rel, target_gamma = _target_width(sigma_rel, gamma)
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    k, step, t_target = _target_time(run_dir, snapshots, step)
    # Only the snapshots taken at or before the target: a later one holds weights the wanted EMA has not seen
    # (EDM2's reconstruct_phema.py keeps the inputs with `0 < nimg <= out_nimg` too).
    snapshots = [s for s in snapshots if s.t <= t_target]
    last = max(snapshots, key=lambda s: s.t)
    out_dir = Path(out_dir) if out_dir is not None else _run_root(run_dir) / f"ema-sigma_rel-{sigma_rel:g}"
    # Every folder read below: the snapshots, and where the configs and tokenizer are copied from. The run folder
    # itself holds the snapshots, so `out_dir` may lie in it but never be it or contain it.
    sources = _metadata_sources(run_dir, last.folder)
    root = _run_root(run_dir)
    inputs = [_posthoc_root(run_dir), *(s.folder for s in snapshots), *(p for p in sources if p != root)]
    out_dir = prepare_output(out_dir, inputs, overwrite, what="`out_dir`")

    x, fit_error = solve_posthoc_weights(
        [s.t for s in snapshots], [s.gamma for s in snapshots], t_target, target_gamma, k
    )
    folders = [read_weight_folder(s.folder) for s in snapshots]
    # The newest snapshot is the layout reference (write_weighted_sum and check_compatible use the last one).
    newest_index = snapshots.index(last)
    order = [i for i in range(len(snapshots)) if i != newest_index] + [newest_index]
    folders = [folders[i] for i in order]
    coefficients = [float(x[i]) for i in order]
    check_compatible(folders)
    if fit_error > 0.05:
        logger.warning("post-hoc fit of sigma_rel=%g is poor (relative profile error %.3f)", sigma_rel, fit_error)

    recipe = {
        "sigma_rel": sigma_rel,
        "gamma": target_gamma,
        "step": step,
        "t": t_target,
        "update_every": k,
        "relative_profile_error": fit_error,
        "snapshots": [
            {
                "path": str(s.folder),
                "step": s.step,
                "t": s.t,
                "gamma": s.gamma,
                "sigma_rel": s.sigma_rel,
                "weight": float(w),
            }
            for s, w in zip(snapshots, x)
        ],
        "hf_ema_version": __version__,
    }
    with atomic_folder(out_dir) as tmp:
        mark_output(tmp, "posthoc")
        write_weighted_sum(folders, coefficients, tmp, progress=progress, desc="post-hoc EMA")
        copy_metadata(tmp, sources)
        write_json(tmp / RECIPE_NAME, recipe)
    logger.info("post-hoc EMA sigma_rel=%g written to %s (profile fit error %.2e)", sigma_rel, out_dir, fit_error)
    return out_dir

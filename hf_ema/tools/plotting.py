"""Plot a run's raw vs EMA evaluation loss (and the stability metrics) from its `trainer_state.json`.

matplotlib (the `plot` extra) is imported inside `run_figure` / `plot_run` only (its `Figure` API, rendered by Agg,
no pyplot), so importing `hf_ema` never needs it. The app draws the same curves with Gradio's own plot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConfigError, require_extra
from ..utils.jsonio import read_json
from ..utils.paths import STATE_NAME, TRAINER_STATE_NAME, checkpoint_step, is_ema_folder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "STABILITY_KEYS",
    "TRAINER_STATE_NAME",
    "RunHistory",
    "Series",
    "find_trainer_state",
    "load_history",
    "plot_run",
    "run_figure",
]

#: Keys `EMACallback(stability_metrics=...)` logs, plotted in the second panel.
STABILITY_KEYS = ("ema_rel_distance", "ema_osc_frac", "ema_osc_freq_mean")
_EMA_LOSS_RE = re.compile(r"^(eval(?:_.+)?)_ema_loss$")


def _global_step(path: Path) -> int:
    try:
        return int(read_json(path).get("global_step", 0))
    except (OSError, ValueError):
        return -1


def find_trainer_state(run_dir: str | os.PathLike) -> Path:
    """The `trainer_state.json` that describes a run.

    `run_dir` may be a checkpoint folder (its own file), a run folder (the most advanced of its own file, written by
    `trainer.save_state()`, and its checkpoints' files, by `global_step`; the run folder's own file on a tie), or an
    `ema/` folder inside either (its parent's).

    Args:
        run_dir (`str` or `os.PathLike`): A run folder, a `checkpoint-N` folder or an `ema/` folder in one.

    Raises:
        `CheckpointError`: when no `trainer_state.json` is found.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"`run_dir` must be a folder, got {str(run_dir)!r}")
    candidates = []
    own = run_dir / TRAINER_STATE_NAME
    if own.is_file():
        candidates.append((_global_step(own), 1, own))
    for child in run_dir.iterdir():
        if checkpoint_step(child) is not None and (child / TRAINER_STATE_NAME).is_file():
            candidates.append((_global_step(child / TRAINER_STATE_NAME), 0, child / TRAINER_STATE_NAME))
    if not candidates and (run_dir / STATE_NAME).is_file():
        # An `ema/` folder: the history is its checkpoint's (or run's).
        return find_trainer_state(run_dir.parent)
    if not candidates:
        raise CheckpointError(
            f"`run_dir` {str(run_dir)!r} holds no {TRAINER_STATE_NAME} (nor any checkpoint-N/ with one)"
        )
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


@dataclass(frozen=True)
class Series:
    """One logged value over optimizer steps.

    Args:
        steps (`list[int]`): The steps it was logged at, in log order.
        values (`list[float]`): Its value at each.
    """

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RunHistory:
    """What a run logged, read from its `trainer_state.json` by [`load_history`].

    Args:
        source (`Path`): The file read.
        global_step (`int`): The step it was written at.
        best_metric (`float`, *optional*): The Trainer's best metric so far.
        best_model_checkpoint (`str`, *optional*): The checkpoint that has it.
        series (`dict[str, Series]`): Every numeric key logged, e.g. `loss`, `eval_loss`, `eval_ema_loss`,
            `eval_ema_is_raw`, `ema_rel_distance`.
        pairs (`list[tuple[str, str]]`): `(raw_key, ema_key)` for each evaluation dataset, e.g.
            `("eval_loss", "eval_ema_loss")`.
    """

    source: Path
    global_step: int
    best_metric: float | None
    best_model_checkpoint: str | None
    series: dict[str, Series]
    pairs: list[tuple[str, str]]

    def loss_curves(self) -> list[tuple[str, Series]]:
        """The loss curves a plot of the run shows, labelled: every raw `eval_*_loss` (`"<key> (raw)"`), then each
        one's EMA twin (`"<key> (EMA)"`); without a pair, `eval_loss` alone, else the training loss (`"loss
        (train)"`). Empty when the run logged no loss."""
        curves = [(f"{raw} (raw)", self.series[raw]) for raw, _ in self.pairs]
        curves += [(f"{ema} (EMA)", self.series[ema]) for _, ema in self.pairs]
        if not curves and "eval_loss" in self.series:
            curves = [("eval_loss", self.series["eval_loss"])]
        if not curves and "loss" in self.series:
            curves = [("loss (train)", self.series["loss"])]
        return curves


def load_history(run_dir: str | os.PathLike) -> RunHistory:
    """The logged series of a run, by key, from its `trainer_state.json`.

    Args:
        run_dir (`str` or `os.PathLike`): A run folder or a `checkpoint-N` folder (see [`find_trainer_state`]).

    Returns:
        [`RunHistory`]: every numeric series by key, and the `(raw, ema)` key pairs.
    """
    path = find_trainer_state(run_dir)
    state = read_json(path)
    series: dict[str, Series] = {}
    for entry in state.get("log_history", []):
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            s = series.setdefault(key, Series())
            s.steps.append(int(step))
            s.values.append(float(value))
    pairs = []
    for key in sorted(series):
        match = _EMA_LOSS_RE.match(key)
        if match and f"{match.group(1)}_loss" in series:
            pairs.append((f"{match.group(1)}_loss", key))
    return RunHistory(
        source=path,
        global_step=int(state.get("global_step", 0)),
        best_metric=state.get("best_metric"),
        best_model_checkpoint=state.get("best_model_checkpoint"),
        series=series,
        pairs=pairs,
    )


def run_figure(run_dir: str | os.PathLike) -> Figure:
    """The figure `plot_run` writes, drawn from the run's logged values: raw `eval_loss` vs `eval_ema_loss` over
    steps (and every other `eval_*_loss` pair), with the stability metrics in a second panel when the run logged
    them.

    Each curve is a `matplotlib.lines.Line2D` labelled with its key: `"<key> (raw)"` and `"<key> (EMA)"` for a pair,
    `"train loss (raw)"`, `"eval_loss"` without an EMA, and the stability keys. Points where the EMA had not
    started (`eval_ema_is_raw == 1`, the EMA numbers are the raw ones) are drawn hollow
    (`"EMA not started (= raw)"`).

    Args:
        run_dir (`str` or `os.PathLike`): A run folder or a `checkpoint-N` folder.

    Returns:
        `matplotlib.figure.Figure`: the figure (rendered by Agg; no pyplot state).

    Raises:
        `CheckpointError`: when the run has no `trainer_state.json` or logged no loss at all.
    """
    require_extra("matplotlib", "plot", "`run_figure`")
    history = _history_with_loss(run_dir)
    return _draw(history, _plotted_folder(run_dir).resolve().name)


def plot_run(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Write a PNG of raw `eval_loss` vs `eval_ema_loss` over steps, with the stability metrics in a second panel
    when the run logged them (the figure of [`run_figure`]).

    Points where the EMA had not started (`eval_ema_is_raw == 1`, the EMA numbers are the raw ones) are drawn hollow.
    The training loss is drawn faintly for context.

    Args:
        run_dir (`str` or `os.PathLike`): A run folder or a `checkpoint-N` folder (or an `ema/` folder in one: the
            plot is of the folder holding it).
        out_path (`str` or `os.PathLike`, *optional*): The PNG to write; defaults to `ema_eval.png` in the run or
            checkpoint folder (never inside an `ema/` folder, which is loaded and uploaded as a whole).

    Returns:
        `Path`: the PNG written.

    Raises:
        `CheckpointError`: when the run has no `trainer_state.json` or logged no loss at all.
    """
    require_extra("matplotlib", "plot", "`plot_run`")
    history = _history_with_loss(run_dir)
    folder = _plotted_folder(run_dir)
    out_path = _check_out_path(Path(out_path) if out_path is not None else folder / "ema_eval.png", history)
    fig = _draw(history, folder.resolve().name)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path


def _plotted_folder(run_dir: str | os.PathLike) -> Path:
    # The history of an `ema/` folder is its checkpoint's (see `find_trainer_state`), and so is the plot.
    return Path(run_dir).parent if is_ema_folder(run_dir) else Path(run_dir)


def _history_with_loss(run_dir: str | os.PathLike) -> RunHistory:
    history = load_history(run_dir)
    if not history.loss_curves():
        raise CheckpointError(f"`run_dir` {str(run_dir)!r} logged no loss to plot ({history.source})")
    return history


def _draw(history: RunHistory, name: str) -> Figure:
    # The object API renders with Agg and touches no global pyplot state (safe in a Gradio server's threads).
    from matplotlib.figure import Figure

    series = history.series
    stability = [k for k in STABILITY_KEYS if k in series]
    fig = Figure(figsize=(8, 6.5 if stability else 4.2), dpi=110, layout="constrained")
    axes = fig.subplots(2 if stability else 1, 1, sharex=True, squeeze=False)[:, 0]
    _draw_losses(axes[0], history)
    axes[0].set_title(f"raw vs EMA: {name} (step {history.global_step})")
    if stability:
        _draw_stability(axes[1], series)
    axes[-1].set_xlabel("optimizer step")
    return fig


def _draw_losses(ax: Any, history: RunHistory) -> None:
    series = history.series
    if "loss" in series:
        ax.plot(series["loss"].steps, series["loss"].values, color="0.75", lw=1, label="train loss (raw)")
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    raw_keys = {raw for raw, _ in history.pairs}
    for i, (raw_key, ema_key) in enumerate(history.pairs):
        c_raw, c_ema = colors[(2 * i) % 4], "tab:orange" if i == 0 else colors[(2 * i + 1) % 4]
        ax.plot(series[raw_key].steps, series[raw_key].values, "o-", color=c_raw, ms=4, label=f"{raw_key} (raw)")
        steps, values = series[ema_key].steps, series[ema_key].values
        ax.plot(steps, values, "-", color=c_ema, lw=1.6, label=f"{ema_key} (EMA)")
        marks = _is_raw_marks(series, ema_key, steps)
        ema_pts = [(s, v) for s, v, r in zip(steps, values, marks) if not r]
        raw_pts = [(s, v) for s, v, r in zip(steps, values, marks) if r]
        if ema_pts:
            ax.plot(*zip(*ema_pts), "s", color=c_ema, ms=4)
        if raw_pts:
            ax.plot(*zip(*raw_pts), "s", mfc="none", color=c_ema, ms=6, label="EMA not started (= raw)")
    if "eval_loss" in series and "eval_loss" not in raw_keys:
        eval_loss = series["eval_loss"]
        ax.plot(eval_loss.steps, eval_loss.values, "o-", color="tab:blue", ms=4, label="eval_loss")
    best = history.best_model_checkpoint
    best_step = checkpoint_step(best) if best else None
    if best_step is not None:
        ax.axvline(best_step, color="0.4", ls=":", lw=1, label="best checkpoint")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _draw_stability(ax: Any, series: dict[str, Series]) -> None:
    if "ema_rel_distance" in series:
        s = series["ema_rel_distance"]
        ax.plot(s.steps, s.values, ".-", color="tab:red", label="ema_rel_distance")
        ax.set_ylabel("relative distance ||theta - ema|| / ||ema||", color="tab:red")
    osc = [k for k in ("ema_osc_frac", "ema_osc_freq_mean") if k in series]
    twin = ax
    if osc:
        twin = ax.twinx() if "ema_rel_distance" in series else ax
        for key, style in zip(osc, ("-", "--")):
            twin.plot(series[key].steps, series[key].values, style, color="tab:cyan", label=key)
        twin.set_ylabel("oscillation", color="tab:cyan")
    lines = ax.get_lines() + (twin.get_lines() if twin is not ax else [])
    # Above the panel: inside it the legend hides the curves, which span the whole height.
    ax.legend(
        lines,
        [line.get_label() for line in lines],
        fontsize=8,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=3,
        frameon=False,
    )
    ax.grid(alpha=0.3)


def _check_out_path(out_path: Path, history: RunHistory) -> Path:
    # Before rendering: a folder, a path below a file, or a file the run reads is refused with one clear line.
    if out_path.is_dir():
        raise ConfigError(
            f"`out_path` `{out_path}` is a folder; name the PNG file to write, e.g. `{out_path}/ema.png`"
        )
    for parent in out_path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"`out_path` `{out_path}` cannot be written: `{parent}` is a file")
            break
    inside = next((p for p in out_path.parents if is_ema_folder(p)), None)
    if inside is not None:
        raise ConfigError(
            f"`out_path` `{out_path}` lies inside the EMA folder `{inside}`, which hf-ema never writes into (it is "
            "loaded and uploaded as a whole); write the PNG beside it"
        )
    if out_path.exists() and out_path.resolve() == history.source.resolve():
        raise ConfigError(f"`out_path` `{out_path}` is the run's history the plot reads; choose another file")
    if out_path.exists() and out_path.suffix.lower() != ".png":
        raise ConfigError(f"`out_path` `{out_path}` exists and is not a PNG; hf-ema only replaces a .png file")
    return out_path


def _is_raw_marks(series: dict[str, Series], ema_key: str, steps: list[int]) -> list[bool]:
    marker = series.get(ema_key[: -len("loss")] + "is_raw")
    if marker is None:
        return [False] * len(steps)
    by_step = dict(zip(marker.steps, marker.values))
    return [by_step.get(s, 0.0) >= 0.5 for s in steps]

"""Merging saved checkpoints: uniform mean, EMA-like exponential weights, and WSM learning-rate-decay emulation.

WSM (Tian et al. 2025, arXiv 2507.17634) trains at a constant learning rate and merges the last checkpoints
instead of decaying it. Merging checkpoints `theta_0 .. theta_n` with weights `c_i` gives
`theta_0 + sum_j w_j * (theta_{j+1} - theta_j)` with `w_j = sum_{i > j} c_i`: every update between two
checkpoints is scaled by `w_j`, as a learning-rate decay with multipliers `w_j` would scale it (exactly for
updates that do not depend on the weights, to first order otherwise). So a decay shape `f` on [0, 1] with
`f(0) = 1` gives `w_j = f((j + 1) / (n + 1))` and `c_0 = 1 - w_0`, `c_i = w_{i-1} - w_i`, `c_n = w_{n-1}`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .._version import __version__
from ..ema_folder import EMA_DIRNAME, STATE_NAME, atomic_folder
from ..errors import CheckpointError, ConfigError, ConfigTypeError
from ..utils.jsonio import write_json
from ..utils.output import mark_output, prepare_output
from ..utils.validation import check_bool, check_int, check_number, is_number
from ..weighted_sum import WeightFolder, check_compatible, copy_metadata, read_weight_folder, write_weighted_sum

__all__ = ["MERGE_RECIPE_NAME", "SCHEDULES", "decay_multipliers", "ema_weights", "merge_checkpoints", "wsm_weights"]

MERGE_RECIPE_NAME = "merge_recipe.json"

#: Decay shapes `f(x)` on [0, 1], `f(0) = 1`, `f(1) = 0`, for WSM.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}

METHODS = ("mean", "ema", "wsm")


def _check_count(n_checkpoints: int) -> None:
    check_int("n_checkpoints", n_checkpoints)
    if n_checkpoints < 2:
        raise ConfigError(f"`n_checkpoints` must be >= 2 (nothing to merge otherwise), got {n_checkpoints!r}")


def _schedule_fn(schedule: str | Callable[[float], float]) -> Callable[[float], float]:
    if callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    raise ConfigError(f"`schedule` must be one of {sorted(SCHEDULES)} or a callable f(x) on [0, 1], got {schedule!r}")


def decay_multipliers(n_checkpoints: int, schedule: str | Callable[[float], float] = "1-sqrt") -> list[float]:
    """The learning-rate multipliers `w_j = f((j + 1) / n_checkpoints)` that a WSM merge emulates.

    `w_j` scales the updates between checkpoint `j` and `j + 1` (oldest first), `j = 0 .. n_checkpoints - 2`.

    Args:
        n_checkpoints (`int`): Number of checkpoints merged, >= 2.
        schedule (`str` or `Callable[[float], float]`, *optional*, defaults to `"1-sqrt"`): `"linear"`, `"cosine"`,
            `"1-sqrt"`, or a decay shape `f(x)` on [0, 1] with `f(0) = 1`, non-increasing, values in [0, 1].

    Raises:
        `ConfigError`: when the multipliers leave [0, 1] or increase (that would need negative merge weights).
    """
    _check_count(n_checkpoints)
    fn = _schedule_fn(schedule)
    # WSM's decay emulation: the decay shape sampled at the end of each interval, w_j = f((j + 1) / (n + 1)).
    w = [float(fn((j + 1) / n_checkpoints)) for j in range(n_checkpoints - 1)]
    tol = 1e-12
    for j, value in enumerate(w):
        if not math.isfinite(value) or value < -tol or value > 1 + tol:
            raise ConfigError(f"`schedule` must take values in [0, 1], got f({(j + 1) / n_checkpoints:g}) = {value!r}")
    for j in range(1, len(w)):
        if w[j] > w[j - 1] + tol:
            raise ConfigError(f"`schedule` must be non-increasing (a decay), got multipliers {w!r}")
    return [min(1.0, max(0.0, v)) for v in w]


def wsm_weights(n_checkpoints: int, schedule: str | Callable[[float], float] = "1-sqrt") -> list[float]:
    """WSM merge weights `c_i` (oldest first) that emulate the learning-rate decay `schedule` over the window.

    `c_0 = 1 - w_0`, `c_i = w_{i-1} - w_i`, `c_n = w_{n-1}` with `w` from [`decay_multipliers`]. For 5 checkpoints,
    `"cosine"` gives about `[.095, .25, .309, .25, .095]`, `"1-sqrt"` about `[.447, .185, .142, .120, .106]` and
    `"linear"` the uniform mean.

    Args:
        n_checkpoints (`int`): Number of checkpoints merged, >= 2.
        schedule (`str` or `Callable[[float], float]`, *optional*, defaults to `"1-sqrt"`): `"linear"`, `"cosine"`,
            `"1-sqrt"` or a decay shape `f(x)` on [0, 1] with `f(0) = 1`.
    """
    w = decay_multipliers(n_checkpoints, schedule)
    # WSM's merge/decay duality (Tian et al. 2025): sum_j c_j theta_j = theta_0 + sum_j w_j (theta_{j+1} - theta_j)
    # with w_j = sum_{i > j} c_i, inverted: c_0 = 1 - w_0, c_i = w_{i-1} - w_i, c_n = w_{n-1}.
    c = [1.0 - w[0]] + [w[i - 1] - w[i] for i in range(1, len(w))] + [w[-1]]
    return c


def ema_weights(n_checkpoints: int, decay: float = 0.5) -> list[float]:
    """Merge weights of an EMA over the checkpoints (oldest first), started at the oldest one.

    `ema = theta_0; ema = decay * ema + (1 - decay) * theta_i` for `i = 1 .. n` gives `c_0 = decay ** n` and
    `c_i = (1 - decay) * decay ** (n - i)`; they sum to 1.

    Args:
        n_checkpoints (`int`): Number of checkpoints merged, >= 2.
        decay (`float`, *optional*, defaults to 0.5): The per-checkpoint decay, in [0, 1).
    """
    _check_count(n_checkpoints)
    check_number("ema_decay", decay, minimum=0.0, maximum=1.0, max_inclusive=False)
    n = n_checkpoints - 1
    # The classic EMA unrolled over the checkpoints: ema_n = decay^n theta_0 + (1 - decay) sum_i decay^(n-i) theta_i.
    return [decay**n] + [(1.0 - decay) * decay ** (n - i) for i in range(1, n + 1)]


def _normalise(weights: Sequence[float], n: int) -> list[float]:
    if not isinstance(weights, (list, tuple)) or not all(is_number(w) for w in weights):
        raise ConfigTypeError(f"`weights` must be a list of numbers, got {weights!r}")
    if len(weights) != n:
        raise ConfigError(f"`weights` must have one entry per checkpoint ({n}), got {len(weights)}: {weights!r}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"`weights` must be finite, >= 0 and not all 0, got {weights!r}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _source_folder(path: Path, use_ema: bool) -> Path:
    if not use_ema:
        return path
    if (path / STATE_NAME).is_file():  # already an `ema/` folder
        return path
    if (path / EMA_DIRNAME / STATE_NAME).is_file() or (path / EMA_DIRNAME).is_dir():
        return path / EMA_DIRNAME
    raise CheckpointError(f"`use_ema=True` but checkpoint `{path}` has no `{EMA_DIRNAME}/` folder")


def merge_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    method: str = "mean",
    schedule: str | Callable[[float], float] | None = None,
    weights: Sequence[float] | None = None,
    ema_decay: float = 0.5,
    use_ema: bool = False,
    sort_by_step: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    allow_config_mismatch: bool = False,
) -> Path:
    """Average saved checkpoints into a new `from_pretrained`-loadable folder, streamed tensor by tensor.

    Works for full models (`model.safetensors` or a sharded index) and PEFT adapters (`adapter_model.safetensors`).
    Tensors are read one at a time with `safetensors.safe_open`, summed in fp32 and written in the source dtype, so
    peak memory is about one model (the output) plus a few tensors, whatever the number of checkpoints. All
    checkpoints are checked (tensor names, shapes, dtypes, architecture) before anything is written, and the
    output folder appears atomically. Configs, tokenizer and `adapter_config.json` are copied from the newest
    checkpoint; the recipe (method, schedule, checkpoints, weights) is written to `merge_recipe.json`.

    ```python
    merge_checkpoints(["out/checkpoint-600", "out/checkpoint-800", "out/checkpoint-1000"], "out/merged",
                      method="wsm", schedule="1-sqrt")
    model = AutoModelForCausalLM.from_pretrained("out/merged")
    ```

    Args:
        checkpoints (`Sequence[str | os.PathLike]`): Checkpoint folders (`checkpoint-N`, an `ema/` folder or any
            `save_pretrained` folder), at least 2.
        output_dir (`str` or `os.PathLike`): The folder to write.
        method (`str`, *optional*, defaults to `"mean"`): `"mean"` (uniform), `"ema"` (see [`ema_weights`]) or
            `"wsm"` (learning-rate decay emulation, see [`wsm_weights`]). Ignored when `weights` is given.
        schedule (`str` or `Callable[[float], float]`, *optional*): The WSM decay shape: `"linear"`, `"cosine"`,
            `"1-sqrt"` or a callable `f(x)` on [0, 1] with `f(0) = 1`. Defaults to `"1-sqrt"` (best in the WSM paper);
            only for `method="wsm"`.
        weights (`Sequence[float]`, *optional*): Explicit merge weights, one per checkpoint in merge order (oldest
            first), >= 0; normalised to sum to 1.
        ema_decay (`float`, *optional*, defaults to 0.5): Per-checkpoint decay of `method="ema"`.
        use_ema (`bool`, *optional*, defaults to `False`): Merge each checkpoint's `ema/` subfolder instead of its raw
            weights.
        sort_by_step (`bool`, *optional*, defaults to `True`): Order the checkpoints by training step (from
            `trainer_state.json`, `ema_state.json` or the `checkpoint-N` name) when every one has a step, so a shell
            glob such as `checkpoint-*` (which sorts 1000 before 200) is merged oldest first. Otherwise the given
            order is kept.
        overwrite (`bool`, *optional*, defaults to `False`): Replace `output_dir` if it exists and hf-ema wrote it.
            `output_dir` may never be, contain or lie inside a checkpoint, nor be a training run folder or a
            non-empty folder hf-ema did not write (see [`prepare_output`]).
        progress (`bool`, *optional*, defaults to `True`): Show a progress bar.
        allow_config_mismatch (`bool`, *optional*, defaults to `False`): Merge checkpoints whose `config.json` (or
            `adapter_config.json`) differ in what the weights mean (e.g. the number of attention heads, with the
            same tensor shapes); the output takes the newest checkpoint's config. Differences in names, paths,
            dtype and versions never count (`weighted_sum.CONFIG_KEYS_IGNORED`).

    Returns:
        `Path`: the output folder.

    Raises:
        `CheckpointError`: when a checkpoint is missing or the checkpoints do not hold the same model.
        `ConfigMismatchError`: their configs describe different models and `allow_config_mismatch` is `False`.
        `ConfigError`: on invalid arguments.
    """
    if isinstance(checkpoints, (str, os.PathLike)) or not isinstance(checkpoints, Sequence):
        raise ConfigTypeError(f"`checkpoints` must be a list of folders, got {checkpoints!r}")
    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise ConfigError(f"`checkpoints` must name at least 2 folders to merge, got {list(map(str, paths))!r}")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = next(str(p) for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise ConfigError(f"`checkpoints` lists `{dup}` more than once")
    check_bool("allow_config_mismatch", allow_config_mismatch)
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {list(METHODS)}, got {method!r}")
    if schedule is not None and method != "wsm":
        raise ConfigError(f"`schedule` only applies to method='wsm', got schedule={schedule!r} with method={method!r}")
    # Before anything is read: the output never replaces an input, a run folder or a folder hf-ema did not write.
    output_dir = prepare_output(output_dir, paths, overwrite, what="`output_dir`")

    folders = [read_weight_folder(_source_folder(p, use_ema)) for p in paths]
    order = list(range(len(paths)))
    steps = [f.step for f in folders]
    if sort_by_step and all(step is not None for step in steps):
        order.sort(key=lambda i: steps[i] or 0)  # all set (checked just above)
    paths = [paths[i] for i in order]
    folders = [folders[i] for i in order]
    check_compatible(folders, allow_config_mismatch=allow_config_mismatch)

    n = len(folders)
    recipe: dict = {"method": method, "use_ema": use_ema}
    if weights is not None:
        # Explicit weights follow the given order, so the reordering above must not shuffle them.
        inverse = [order.index(i) for i in range(n)]
        given = _normalise(list(weights), n)
        coefficients = [0.0] * n
        for i, w in enumerate(given):
            coefficients[inverse[i]] = w
        recipe["method"] = "custom"
    elif method == "mean":
        coefficients = [1.0 / n] * n
    elif method == "ema":
        coefficients = ema_weights(n, ema_decay)
        recipe["ema_decay"] = ema_decay
    else:
        schedule = "1-sqrt" if schedule is None else schedule
        coefficients = wsm_weights(n, schedule)
        recipe["schedule"] = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", repr(schedule))
        recipe["decay_multipliers"] = decay_multipliers(n, schedule)

    recipe.update(
        {
            "kind": folders[-1].kind,
            "checkpoints": [
                {"path": str(p), "weights_from": str(f.folder), "step": f.step, "weight": c}
                for p, f, c in zip(paths, folders, coefficients)
            ],
            "hf_ema_version": __version__,
        }
    )
    return _write_merge(folders, coefficients, output_dir, recipe, paths[-1], progress)


def _write_merge(
    folders: list[WeightFolder],
    coefficients: list[float],
    output_dir: Path,
    recipe: dict,
    newest: Path,
    progress: bool,
) -> Path:
    with atomic_folder(output_dir) as tmp:
        mark_output(tmp, "merge")
        write_weighted_sum(folders, coefficients, tmp, progress=progress, desc="merging checkpoints")
        copy_metadata(tmp, [folders[-1].folder, newest])
        write_json(tmp / MERGE_RECIPE_NAME, recipe)
    return output_dir

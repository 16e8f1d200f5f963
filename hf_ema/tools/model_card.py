"""The model card of a pushed EMA: it says the weights are an EMA, with the decay, the step and raw vs EMA metrics."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..ema_folder import EMA_DIRNAME, STATE_NAME, read_ema_state
from ..errors import CheckpointError, ConfigTypeError
from ..utils.jsonio import read_json
from ..utils.paths import TRAINER_STATE_NAME, checkpoint_dir
from ..utils.validation import is_number

__all__ = [
    "CARD_NAME",
    "ema_card_text",
    "eval_metrics_from_log_history",
    "locate_ema_folder",
    "read_eval_metrics",
    "write_model_card",
]

CARD_NAME = "README.md"
# The EMA section of a card is delimited so that a later push replaces it instead of appending a second one.
SECTION_START = "<!-- hf-ema:start -->"
SECTION_END = "<!-- hf-ema:end -->"
# Files where the Trainer (`save_metrics`) or `hf-ema demo` store final metrics, in a run folder.
RESULT_FILES = ("eval_results.json", "all_results.json", "hf_ema_demo.json")
# `eval_*` entries that are not quality metrics.
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "is_raw"}


def locate_ema_folder(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Find the `ema/` folder behind `path` and the folder that holds its training state.

    Args:
        path (`str` or `os.PathLike`): An `ema/` folder, a checkpoint folder or a run folder holding `ema/`.

    Returns:
        `tuple[Path, Path | None]`: the `ema/` folder and the checkpoint / run folder around it (where
        `trainer_state.json` and result files are looked for), `None` when `path` is a lone `ema/` folder.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigTypeError(f"`path` must be a path, got {path!r}")
    path = Path(path)
    if (path / STATE_NAME).is_file():
        parent = path.parent
        step = read_ema_state(path).get("step")
        state_files = [parent / TRAINER_STATE_NAME, *(parent / name for name in RESULT_FILES)]
        if isinstance(step, int):
            state_files.append(checkpoint_dir(parent, step) / TRAINER_STATE_NAME)
        return path, (parent if any(f.is_file() for f in state_files) else None)
    if (path / EMA_DIRNAME / STATE_NAME).is_file():
        return path / EMA_DIRNAME, path
    raise CheckpointError(
        f"`path` must be an hf-ema `ema/` folder or a checkpoint / run folder holding one, got {str(path)!r} "
        f"(no {STATE_NAME} in it or in its {EMA_DIRNAME}/)"
    )


def _split_key(key: str) -> tuple[str, str]:
    """`eval_loss` -> (`loss`, raw); `eval_ema_loss` -> (`loss`, ema); `eval_val_ema_loss` -> (`val_loss`, ema)."""
    rest = key[len("eval_") :]
    if rest.startswith("ema_"):
        return rest[len("ema_") :], "ema"
    # With a dict of eval datasets the Trainer logs `eval_<name>_loss`, and EMACallback `eval_<name>_ema_loss`.
    head, sep, tail = rest.partition("_ema_")
    if sep and head and tail:
        return f"{head}_{tail}", "ema"
    return rest, "raw"


def _pair_metrics(flat: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{"eval_loss": a, "eval_ema_loss": b}` -> `{"loss": {"raw": a, "ema": b}}`."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if not key.startswith("eval_") or not is_number(value):
            continue
        name, kind = _split_key(key)
        if any(name == skip or name.endswith(f"_{skip}") for skip in _NOT_METRICS):
            continue
        out.setdefault(name, {})[kind] = float(value)
    return out


def eval_metrics_from_log_history(log_history: Iterable[dict[str, Any]], step: int | None = None) -> dict[str, Any]:
    """Raw vs EMA evaluation metrics from a `TrainerState.log_history`.

    Raw metrics are the `eval_<name>` entries, EMA metrics the `eval_ema_<name>` ones (as logged by
    `trainer.evaluate(metric_key_prefix="eval_ema")` with the EMA swapped in). The latest step (not after `step`)
    that has EMA metrics is used, else the latest step with any evaluation.

    Args:
        log_history (`Iterable[dict]`): The Trainer's log history.
        step (`int`, *optional*): Ignore entries after this step (the EMA's step).

    Returns:
        `dict`: `{"step": int, "metrics": {name: {"raw": float, "ema": float}}}`, or `{}` when nothing was logged.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        entry_step = entry.get("step")
        if not isinstance(entry_step, int) or (step is not None and entry_step > step):
            continue
        evals = {k: v for k, v in entry.items() if k.startswith("eval_") and is_number(v)}
        if evals:
            by_step.setdefault(entry_step, {}).update(evals)
    with_ema = [s for s, flat in by_step.items() if any(_split_key(k)[1] == "ema" for k in flat)]
    candidates = with_ema or list(by_step)
    if not candidates:
        return {}
    chosen = max(candidates)
    metrics = _pair_metrics(by_step[chosen])
    if not metrics:
        return {}
    # `EMACallback(eval_ema=True)` logs `eval_ema_is_raw = 1` (and the raw numbers) while the EMA had not started.
    is_raw = any(v == 1 for k, v in by_step[chosen].items() if k.endswith("_ema_is_raw"))
    return {"step": chosen, "metrics": metrics, "ema_is_raw": is_raw}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _completeness(found: dict[str, Any]) -> tuple[int, int]:
    metrics = found.get("metrics", {})
    return sum(1 for m in metrics.values() if "raw" in m and "ema" in m), len(metrics)


def read_eval_metrics(ema_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Raw vs EMA evaluation metrics recorded for an `ema/` folder, when any were.

    Looked for in `ema_state.json` (`eval_*` / `eval_ema_*` entries), in `trainer_state.json` of `run_dir` (or of
    `run_dir/checkpoint-<step>` when the run folder has none), and in the run folder's `eval_results.json`,
    `all_results.json` and `hf_ema_demo.json`; the source with the most raw/EMA pairs wins.

    Args:
        ema_dir (`str` or `os.PathLike`): The `ema/` folder.
        run_dir (`str` or `os.PathLike`, *optional*): The checkpoint or run folder around it.

    Returns:
        `dict`: `{"step": int | None, "metrics": {name: {"raw": float, "ema": float}}, "source": str}` or `{}`.
    """
    ema_dir = Path(ema_dir)
    ema_state = read_ema_state(ema_dir)
    step = ema_state.get("step")
    found: list[dict[str, Any]] = []
    flat = dict(ema_state.get("metrics") or {})
    flat.update({k: v for k, v in ema_state.items() if k.startswith("eval_")})
    if _pair_metrics(flat):
        found.append({"step": step, "metrics": _pair_metrics(flat), "source": f"`{EMA_DIRNAME}/{STATE_NAME}`"})
    if run_dir is not None:
        run_dir = Path(run_dir)
        state_files = [run_dir / TRAINER_STATE_NAME]
        if isinstance(step, int):
            state_files.append(checkpoint_dir(run_dir, step) / TRAINER_STATE_NAME)
        for state_file in state_files:
            data = _read_json(state_file)
            if data is None:
                continue
            from_log = eval_metrics_from_log_history(data.get("log_history") or [], step=step)
            if from_log:
                found.append({**from_log, "source": f"`{state_file.relative_to(run_dir).as_posix()}`"})
            break
        for name in RESULT_FILES:
            data = _read_json(run_dir / name)
            metrics = _pair_metrics(data) if data is not None else {}
            if metrics:
                found.append({"step": step, "metrics": metrics, "source": f"`{name}`"})
    if not found:
        return {}
    # max() keeps the first of equals, so the order above is the tie-break.
    return max(found, key=_completeness)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _horizon(config: dict[str, Any]) -> str:
    bema = config.get("bema")
    if isinstance(bema, dict):
        params = ", ".join(f"{k}={bema[k]}" for k in ("eta", "kappa", "rho", "gamma", "tau") if k in bema)
        return f"BEMA, bias-corrected EMA (Block & Zhang 2025; {params})"
    if config.get("sigma_rel") is not None:
        return f"power-function EMA, `sigma_rel={config['sigma_rel']}` (EDM2)"
    if config.get("half_life") is not None:
        return f"`half_life={config['half_life']}` optimizer steps"
    if config.get("decay") is not None:
        return f"`decay={config['decay']}` per optimizer step"
    return "`decay=0.999` per optimizer step (default)"


def _load_snippet(ema_dir: Path, repo_id: str, subfolder: str | None) -> str:
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    adapter = _read_json(ema_dir / "adapter_config.json")
    if adapter is not None:
        base = adapter.get("base_model_name_or_path") or "<base model>"
        return (
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}"{sub})\n'
            "```"
        )
    config = _read_json(ema_dir / "config.json") or {}
    architectures = config.get("architectures") or []
    auto = "AutoModelForCausalLM" if any(a.endswith("ForCausalLM") for a in architectures) else "AutoModel"
    return f'```python\nfrom transformers import {auto}\n\nmodel = {auto}.from_pretrained("{repo_id}"{sub})\n```'


def _section(ema_dir: Path, repo_id: str, subfolder: str | None, metrics: dict[str, Any]) -> str:
    state = read_ema_state(ema_dir)
    config = state.get("config") or {}
    where = f"The weights in `{subfolder}/`" if subfolder else "This repository's main weights"
    every = config.get("update_every", 1)
    what = "an **exponential moving average (EMA)**"
    if isinstance(config.get("bema"), dict):
        # BEMA (arXiv 2508.00180): the EMA plus a decaying share of the distance the weights travelled since tau.
        what = (
            "a **bias-corrected exponential moving average (BEMA**, arXiv 2508.00180: the EMA plus "
            "`alpha_t * (theta_t - theta_0)`, which removes its lag)"
        )
    lines = [
        SECTION_START,
        "## EMA weights",
        "",
        f"{where} are {what} of the training weights, kept by "
        "hf-ema during training with the Hugging Face `Trainer`: they are "
        "not the raw weights of the last optimizer step.",
        "",
        "| | |",
        "|---|---|",
        f"| EMA horizon | {_horizon(config)} |",
        f"| Decay of the last update | {_fmt(state.get('decay'))}"
        + (f" (over {every} optimizer steps)" if every != 1 else "")
        + " |",
        f"| Step (optimizer steps) | {_fmt(state.get('step'))} |",
        f"| EMA updates | {_fmt(state.get('num_updates'))} |",
        f"| Update every | {every} optimizer step{'s' if every != 1 else ''} |",
        f"| Warmup | {'yes' if config.get('warmup') else 'no'} |",
        f"| EMA dtype | {config.get('dtype', 'float32')} |",
        "",
        "### Evaluation: raw vs EMA weights",
        "",
    ]
    if metrics.get("metrics"):
        lines += ["| Metric | Raw weights | EMA weights |", "|---|---|---|"]
        for name, pair in sorted(metrics["metrics"].items()):
            lines.append(f"| {name} | {_fmt(pair.get('raw'))} | {_fmt(pair.get('ema'))} |")
        lines += [
            "",
            f"Measured at step {_fmt(metrics.get('step'))} (from {metrics.get('source', 'the training logs')}).",
        ]
        if metrics.get("ema_is_raw"):
            lines[-1] += " The EMA had not started averaging yet at that step: its numbers are the raw weights'."
    else:
        lines.append("No evaluation metrics were recorded with these weights.")
    lines += ["", "### Loading", "", _load_snippet(ema_dir, repo_id, subfolder), SECTION_END]
    return "\n".join(lines)


def ema_card_text(
    ema_dir: str | os.PathLike,
    repo_id: str | None = None,
    subfolder: str | None = EMA_DIRNAME,
    metrics: dict[str, Any] | None = None,
    existing: str | None = None,
) -> str:
    """The text of a model card (`README.md`) describing an EMA.

    Args:
        ema_dir (`str` or `os.PathLike`): The `ema/` folder.
        repo_id (`str`, *optional*): The Hub repository, for the loading example (a placeholder when `None`).
        subfolder (`str`, *optional*, defaults to `"ema"`): Where the EMA lies in the repository; `None` when it is
            the repository's main weights.
        metrics (`dict`, *optional*): Output of [`read_eval_metrics`] / [`eval_metrics_from_log_history`].
        existing (`str`, *optional*): An existing card to update: its metadata is kept (tags `ema` and `hf-ema`
            added) and its EMA section replaced, or appended when it has none.
    """
    from huggingface_hub import ModelCard, ModelCardData

    ema_dir = Path(ema_dir)
    section = _section(ema_dir, repo_id or "<repo_id>", subfolder, metrics or {})
    if existing:
        card = ModelCard(existing, ignore_metadata_errors=True)
        data: Any = card.data  # a `ModelCardData` (typed as its base `CardData`)
        body = card.text
    else:
        library = "peft" if (ema_dir / "adapter_config.json").is_file() else "transformers"
        data = ModelCardData(library_name=library)
        title = repo_id.split("/")[-1] if repo_id else "EMA weights"
        body = f"\n# {title}\n\n"
    tags = list(data.tags or [])
    data.tags = tags + [t for t in ("ema", "hf-ema") if t not in tags]
    start, end = body.find(SECTION_START), body.find(SECTION_END)
    if start != -1 and end > start:
        body = body[:start] + section + body[end + len(SECTION_END) :]
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    return f"---\n{data.to_yaml()}\n---\n" + ("" if body.startswith("\n") else "\n") + body


def write_model_card(
    ema_dir: str | os.PathLike,
    repo_id: str | None = None,
    subfolder: str | None = EMA_DIRNAME,
    metrics: dict[str, Any] | None = None,
    log_history: Iterable[dict[str, Any]] | None = None,
) -> Path:
    """Write (or update) `README.md` in an `ema/` folder: a model card saying the weights are an EMA.

    Args:
        ema_dir (`str` or `os.PathLike`): The `ema/` folder.
        repo_id (`str`, *optional*): The Hub repository, for the loading example.
        subfolder (`str`, *optional*, defaults to `"ema"`): Where the EMA lies in the repository; `None` for the
            repository's main weights.
        metrics (`dict`, *optional*): Raw vs EMA metrics (see [`read_eval_metrics`]); read from the folders around
            `ema_dir` when neither this nor `log_history` is given.
        log_history (`Iterable[dict]`, *optional*): A live `TrainerState.log_history` to take the metrics from.

    Returns:
        `Path`: the card's path.
    """
    ema_dir = Path(ema_dir)
    if metrics is None:
        if log_history is not None:
            metrics = eval_metrics_from_log_history(log_history, step=read_ema_state(ema_dir).get("step"))
            if metrics:
                metrics["source"] = "the Trainer's log history"
        else:
            metrics = read_eval_metrics(*locate_ema_folder(ema_dir))
    path = ema_dir / CARD_NAME
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    path.write_text(ema_card_text(ema_dir, repo_id, subfolder, metrics, existing=existing), encoding="utf-8")
    return path

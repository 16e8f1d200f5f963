#!/usr/bin/env python
"""Constant learning rate + EMA or checkpoint merging versus cosine decay, on the offline tiny Llama.

From the same seed (same initialisation, same batches) the tiny Llama of `hf_ema.demo.toy` is trained twice on the
bundled `pydoc_data.topics` corpus:

(a) cosine decay of the learning rate to zero after a linear warmup (the baseline to match);
(b) a constant learning rate after the same warmup, with `hf_ema.EMACallback` keeping EMAs of several decays
    (written into every `checkpoint-N/ema*/`);
(c) the checkpoints of run (b) merged with `hf_ema.tools.merge.merge_checkpoints`: the uniform mean and WSM decay
    emulation (cosine, 1-sqrt), over windows of several checkpoints;
(d) post-hoc EMAs of a few widths `sigma_rel`, reconstructed by `hf_ema.posthoc.reconstruct` from the
    power-function EMA snapshots that `EMACallback(posthoc=...)` keeps during run (b).

Every checkpoint of both runs, its EMAs and a merge of the last few checkpoints are evaluated on a fixed subset of
the held-out documents (the other merge windows and the post-hoc EMAs at the last step only).
The whole thing is repeated for several seeds; a Markdown table, a CSV and a PNG plot summarise it.

    python examples/experiments/constant_lr_vs_decay.py --report-dir docs   # 3 seeds, ~3 min on 2 CPU cores
    python examples/experiments/constant_lr_vs_decay.py --quick             # smoke test, well under a minute

Finished training runs found in `--out` are reused (pass `--force` to retrain); `--render-only` redraws the
table and plot from `--out/results.csv`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hf_ema import EMACallback  # noqa: E402
from hf_ema.errors import CheckpointError, ConfigError  # noqa: E402

NAME = "constant_lr_vs_decay"
SCHEDULE_RUNS = ("cosine", "constant")
TRAINING_FIELDS = (
    "steps", "warmup_steps", "save_every", "learning_rate", "batch_size", "block_size", "hidden_size", "num_layers",
    "num_heads", "vocab_size", "ema_decays", "posthoc_tracked", "bema",
)  # fmt: skip
#: The method names of the bias-corrected EMA (BEMA), and of its plain EMA alone (BEMA's schedule, no correction:
#: the `ema_state.safetensors` of the same folder), which tells the correction's share from the schedule's.
BEMA_METHOD = "bema"
BEMA_PLAIN_METHOD = "bema-ema"


@dataclass
class ExperimentConfig:
    """Every knob of the experiment (the defaults are the published run).

    Args:
        seeds (`list[int]`, *optional*, defaults to `[0, 1, 2]`): One pair of runs per seed.
        steps (`int`, *optional*, defaults to 600): Optimizer steps per run.
        warmup_steps (`int`, *optional*, defaults to 50): Linear warmup of both runs; the EMAs start after it.
        save_every (`int`, *optional*, defaults to 50): Checkpoint (and evaluation) interval; divides `steps`.
        learning_rate (`float`, *optional*, defaults to 5e-3): Peak (cosine) and constant learning rate.
        batch_size (`int`, *optional*, defaults to 16): Blocks per step.
        block_size (`int`, *optional*, defaults to 64): Tokens per block.
        hidden_size (`int`, *optional*, defaults to 64): Model width.
        num_layers (`int`, *optional*, defaults to 2): Model depth.
        num_heads (`int`, *optional*, defaults to 4): Attention heads.
        vocab_size (`int`, *optional*, defaults to 512): BPE vocabulary size.
        eval_blocks (`int`, *optional*, defaults to 128): Size of the fixed, evenly spaced eval subset.
        ema_decays (`list[float]`, *optional*): EMA decays of the constant-LR run; the first is written to `ema/`
            by a plain `EMACallback`, the others to `ema-<decay>/`.
        merge_windows (`list[int]`, *optional*): Merge windows, in checkpoints, evaluated at the last step.
        merge_schedules (`list[str]`, *optional*): `"mean"` or a WSM decay shape (`"cosine"`, `"1-sqrt"`, ...).
        curve_window (`int`, *optional*, defaults to 5): The window merged at every checkpoint (for the curves).
        posthoc_sigma_rels (`list[float]`, *optional*): Post-hoc EMA widths reconstructed at the last step (empty:
            no post-hoc EMA).
        posthoc_tracked (`list[float]`, *optional*, defaults to `[0.05, 0.1]`): The power-function EMAs tracked
            during training and snapshotted at every save (EDM2's defaults).
        bema (`bool`, *optional*, defaults to `True`): Also keep a bias-corrected EMA (BEMA, the paper's and trl's
            defaults) with its burn-in at the end of the warmup, written to `ema-bema/`.
        threads (`int`, *optional*, defaults to 1): torch CPU threads (1 is fastest for this size on a busy box).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 600
    warmup_steps: int = 50
    save_every: int = 50
    learning_rate: float = 5e-3
    batch_size: int = 16
    block_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 512
    eval_blocks: int = 128
    ema_decays: list[float] = field(default_factory=lambda: [0.99, 0.98, 0.995, 0.998])
    merge_windows: list[int] = field(default_factory=lambda: [2, 3, 5, 9])
    merge_schedules: list[str] = field(default_factory=lambda: ["mean", "cosine", "1-sqrt"])
    curve_window: int = 5
    posthoc_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    posthoc_tracked: list[float] = field(default_factory=lambda: [0.05, 0.1])
    bema: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps % self.save_every != 0:
            raise ConfigError(
                f"`save_every` must divide `steps`, got save_every={self.save_every!r}, steps={self.steps!r}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"`warmup_steps` must be in [0, steps), got {self.warmup_steps!r}")
        n = self.steps // self.save_every
        for k in [*self.merge_windows, self.curve_window]:
            if not 2 <= k <= n:
                raise ConfigError(f"merge windows must be in [2, {n}] checkpoints, got {k!r}")
        if not self.ema_decays or not self.seeds:
            raise ConfigError(f"`ema_decays` and `seeds` must not be empty, got {self.ema_decays!r}, {self.seeds!r}")

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps at which both runs save (and are evaluated)."""
        return list(range(self.save_every, self.steps + 1, self.save_every))

    def ema_dirname(self, decay: float) -> str:
        """The folder inside a checkpoint that holds the EMA of `decay`."""
        return "ema" if decay == self.ema_decays[0] else f"ema-{decay:g}"


# ---------------------------------------------------------------------------------------------- method names
def ema_method(decay: float) -> str:
    return f"ema-{decay:g}"


def merge_method(schedule: str, window: int) -> str:
    return f"merge-{schedule}-k{window}"


def posthoc_method(sigma_rel: float) -> str:
    return f"posthoc-{sigma_rel:g}"


def describe(method: str, cfg: ExperimentConfig) -> str:
    """A readable label: `merge-1-sqrt-k5` -> `constant + WSM 1-sqrt merge, 5 ckpts (200 steps)`."""
    if method == "cosine":
        return "cosine decay to 0 (raw)"
    if method == "constant":
        return "constant LR (raw)"
    if method == BEMA_METHOD:
        return f"constant + BEMA (burn-in {cfg.warmup_steps} steps)"
    if method == BEMA_PLAIN_METHOD:
        return "constant + BEMA's EMA alone (no correction)"
    family, _, rest = method.partition("-")
    if family == "ema":
        return f"constant + EMA {rest} (~{1 / (1 - float(rest)):.0f} steps)"
    if family == "posthoc":
        return f"constant + post-hoc EMA sigma_rel {rest}"
    schedule, _, k = rest.rpartition("-k")
    kind = "mean merge" if schedule == "mean" else f"WSM {schedule} merge"
    return f"constant + {kind}, {k} ckpts ({(int(k) - 1) * cfg.save_every} steps)"


# ---------------------------------------------------------------------------------------------- training
class _ExtraEMACallback(EMACallback):
    """An `EMACallback` that writes `<dirname>/` instead of `ema/`, so one run can keep several horizons."""

    def __init__(self, dirname: str, **kwargs: Any) -> None:
        super().__init__(save_final=False, eval_ema=False, **kwargs)
        self.dirname = dirname

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.save(folder / self.dirname, state=state)


def _progress_callback(bar):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)

    return _Progress()


def train_run(cfg: ExperimentConfig, seed: int, schedule: str, run_dir: Path, tokenizer, train_ds, bar) -> None:
    """Train one run (`schedule` is `"cosine"` or `"constant"`), saving every `cfg.save_every` steps.

    Skipped when `run_dir/done.json` records the same settings (a finished run).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_ema.demo.toy import tiny_causal_lm

    # Only what changes the trained weights: other settings (eval, merges, seeds list) can change without retraining.
    settings = {name: getattr(cfg, name) for name in TRAINING_FIELDS}
    settings.update(seed=seed, schedule=schedule, posthoc=bool(cfg.posthoc_sigma_rels))
    marker = run_dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text())["settings"] == settings:
        bar.update(cfg.steps)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    model = tiny_causal_lm(
        tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads, seed=seed
    )
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine" if schedule == "cosine" else "constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_only_model=True,
        logging_steps=cfg.save_every,
        eval_strategy="no",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    callbacks = [_progress_callback(bar)]
    if schedule == "constant":
        # The EMAs only average the post-warmup trajectory: before `start_step` they copy the weights.
        first, *others = cfg.ema_decays
        # It also keeps EDM2's two power-function EMAs and snapshots them at every save, for the post-hoc EMA.
        posthoc = {"sigma_rels": list(cfg.posthoc_tracked)} if cfg.posthoc_sigma_rels else None
        callbacks.append(EMACallback(decay=first, start_step=cfg.warmup_steps, posthoc=posthoc))
        for decay in others:
            callbacks.append(_ExtraEMACallback(cfg.ema_dirname(decay), decay=decay, start_step=cfg.warmup_steps))
        if cfg.bema:
            # BEMA with the paper's defaults; its burn-in (theta_0) at the end of the warmup, as the EMAs start.
            callbacks.append(_ExtraEMACallback(f"ema-{BEMA_METHOD}", bema={"tau": cfg.warmup_steps}))
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # our own progress bar instead of printed log dicts
    trainer.train()
    marker.write_text(
        json.dumps({"settings": settings, "train_runtime_s": trainer.state.log_history[-1].get("train_runtime")})
    )


# ---------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Loads weights folders into one template model and measures its mean token loss on fixed eval blocks.

    Args:
        model (`PreTrainedModel`): The template (its architecture must match every folder).
        input_ids (`torch.Tensor`): `(n_blocks, block_size)` eval tokens (the labels are the inputs).
        batch_size (`int`, *optional*, defaults to 32): Blocks per forward pass.
    """

    def __init__(self, model, input_ids: torch.Tensor, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.input_ids = input_ids
        self.batch_size = batch_size
        # Tied output embeddings are not stored in `save_pretrained` folders.
        self.tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()

    def load(self, folder: Path, file: str = "model.safetensors") -> None:
        from safetensors.torch import load_file

        path = Path(folder) / file
        if not path.is_file():
            raise CheckpointError(f"`folder` has no {file}, got {str(folder)!r}")
        # `ema_state.safetensors` of a BEMA folder also holds theta_0 (keys `bema_theta0.<name>`).
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bema_theta0.")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - self.tied:
            raise CheckpointError(f"weights in {str(folder)!r} do not match the model: {missing=} {unexpected=}")

    @torch.no_grad()
    def loss(self) -> float:
        """Token-weighted mean next-token cross-entropy of the current weights."""
        total, count = 0.0, 0
        for start in range(0, len(self.input_ids), self.batch_size):
            ids = self.input_ids[start : start + self.batch_size]
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += self.model(input_ids=ids, labels=ids).loss.item() * n
            count += n
        return total / count

    def __call__(self, folder: Path, file: str = "model.safetensors") -> float:
        self.load(folder, file)
        return self.loss()


def eval_subset(eval_ds, n_blocks: int) -> torch.Tensor:
    """`n_blocks` evenly spaced blocks of the eval split (fixed, so every model sees the same tokens)."""
    n = len(eval_ds)
    idx = sorted({round(i * n / n_blocks) for i in range(min(n_blocks, n))})
    return eval_ds.select(idx).input_ids


def merge_window(checkpoints: list[Path], out_dir: Path, schedule: str) -> Path:
    """Merge raw checkpoints (oldest first) with `hf_ema.tools.merge.merge_checkpoints`: the uniform mean or WSM."""
    from hf_ema.tools.merge import merge_checkpoints

    method, kwargs = ("mean", {}) if schedule == "mean" else ("wsm", {"schedule": schedule})
    return merge_checkpoints(checkpoints, out_dir, method=method, overwrite=True, progress=False, **kwargs)


def posthoc_ema(run_dir: Path, out_dir: Path, sigma_rel: float) -> Path:
    """Reconstruct the power-function EMA of width `sigma_rel` at the run's last snapshot (`hf_ema.posthoc`)."""
    from hf_ema.posthoc import reconstruct

    return reconstruct(run_dir, sigma_rel=sigma_rel, out_dir=out_dir, overwrite=True, progress=False)


def plan_evaluations(cfg: ExperimentConfig, seed_dir: Path) -> list[dict[str, Any]]:
    """Every (step, method) to evaluate for one seed, with the folder (or the checkpoints to merge) it needs."""
    cosine, constant = seed_dir / "cosine", seed_dir / "constant"
    steps = cfg.checkpoint_steps
    jobs = []
    for i, step in enumerate(steps):
        ckpt = constant / f"checkpoint-{step}"
        jobs.append({"step": step, "method": "cosine", "folder": cosine / f"checkpoint-{step}"})
        jobs.append({"step": step, "method": "constant", "folder": ckpt})
        for decay in cfg.ema_decays:
            jobs.append({"step": step, "method": ema_method(decay), "folder": ckpt / cfg.ema_dirname(decay)})
        if cfg.bema:
            folder = ckpt / f"ema-{BEMA_METHOD}"
            jobs.append({"step": step, "method": BEMA_METHOD, "folder": folder})
            jobs.append({"step": step, "method": BEMA_PLAIN_METHOD, "folder": folder, "file": "ema_state.safetensors"})
        windows = set(cfg.merge_windows) | {cfg.curve_window} if step == cfg.steps else {cfg.curve_window}
        for k in sorted(windows):
            if i + 1 < k:
                continue
            window = [constant / f"checkpoint-{s}" for s in steps[i + 1 - k : i + 1]]
            for schedule in cfg.merge_schedules:
                jobs.append({"step": step, "method": merge_method(schedule, k), "merge": (window, schedule)})
    # Only at the last step: a reconstruction at an earlier step would also fit snapshots taken after it.
    for sigma_rel in cfg.posthoc_sigma_rels:
        jobs.append({"step": cfg.steps, "method": posthoc_method(sigma_rel), "posthoc": (constant, sigma_rel)})
    return jobs


def run_experiment(
    cfg: ExperimentConfig, out_dir: Path, progress: bool = True, force: bool = False
) -> tuple[list[dict], int]:
    """Train, merge and evaluate every seed. Returns one row per (seed, step, method) and the parameter count."""
    import transformers
    from tqdm.auto import tqdm

    from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(cfg.threads)

    tokenizer = train_tokenizer(vocab_size=cfg.vocab_size)
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=cfg.block_size)
    evaluator = Evaluator(
        tiny_causal_lm(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads),
        eval_subset(eval_ds, cfg.eval_blocks),
    )
    if force:
        shutil.rmtree(out_dir, ignore_errors=True)
    plans = {seed: plan_evaluations(cfg, out_dir / f"seed-{seed}") for seed in cfg.seeds}
    total = sum(2 * cfg.steps + len(p) for p in plans.values())
    rows = []
    with tqdm(total=total, desc=NAME, unit="it", disable=not progress, dynamic_ncols=True) as bar:
        for seed, jobs in plans.items():
            seed_dir = out_dir / f"seed-{seed}"
            for schedule in SCHEDULE_RUNS:
                bar.set_description(f"seed {seed}: train {schedule}")
                train_run(cfg, seed, schedule, seed_dir / schedule, tokenizer, train_ds, bar)
            bar.set_description(f"seed {seed}: evaluate")
            for job in jobs:
                if "merge" in job:
                    window, schedule = job["merge"]
                    folder = merge_window(window, seed_dir / "merged-tmp", schedule)
                elif "posthoc" in job:
                    run_dir, sigma_rel = job["posthoc"]
                    folder = posthoc_ema(run_dir, seed_dir / "merged-tmp", sigma_rel)
                else:
                    folder = job["folder"]
                loss = evaluator(folder, job.get("file", "model.safetensors"))
                rows.append(
                    {
                        "seed": seed,
                        "step": job["step"],
                        "method": job["method"],
                        "eval_loss": loss,
                        "ppl": math.exp(loss),
                    }
                )
                bar.update(1)
            shutil.rmtree(seed_dir / "merged-tmp", ignore_errors=True)
    n_params = sum(p.numel() for p in evaluator.model.parameters())
    return rows, n_params


# ---------------------------------------------------------------------------------------------- reporting
def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["seed", "step", "method", "eval_loss", "ppl"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "eval_loss": f"{row['eval_loss']:.6f}", "ppl": f"{row['ppl']:.4f}"})


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [
            {"seed": int(r["seed"]), "step": int(r["step"]), "method": r["method"], "eval_loss": float(r["eval_loss"]),
             "ppl": float(r["ppl"])}
            for r in csv.DictReader(f)
        ]  # fmt: skip


def _losses(rows: list[dict], method: str, step: int) -> dict[int, float]:
    return {r["seed"]: r["eval_loss"] for r in rows if r["method"] == method and r["step"] == step}


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def summarize(rows: list[dict], cfg: ExperimentConfig) -> list[dict]:
    """Per method at the last step: mean/std/min/max over seeds, the paired difference to cosine, and the first
    checkpoint at which the seed-mean loss is at or below cosine's final seed-mean loss."""
    final = cfg.steps
    cosine = _losses(rows, "cosine", final)
    target = statistics.fmean(cosine.values())
    out = []
    for method in _methods(rows):
        losses = _losses(rows, method, final)
        if not losses:
            continue
        values = list(losses.values())
        diffs = [losses[s] - cosine[s] for s in losses if s in cosine]
        first = next(
            (
                s
                for s in cfg.checkpoint_steps
                if (v := _losses(rows, method, s)) and statistics.fmean(v.values()) <= target
            ),
            None,
        )
        out.append(
            {
                "method": method,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "delta": statistics.fmean(diffs),
                "wins": sum(d <= 0 for d in diffs),
                "n": len(values),
                "first_step": first,
                # Curves are evaluated at every checkpoint (merges once their window fits), the rest at the end only.
                "every_step": len({r["step"] for r in rows if r["method"] == method}) > 1,
            }
        )
    return out


def _verdict(summary: list[dict], cfg: ExperimentConfig) -> list[str]:
    by = {s["method"]: s for s in summary}
    cos, const = by["cosine"], by["constant"]
    lines = [
        f"- Cosine decay to 0 ends at {cos['mean']:.4f} (ppl {math.exp(cos['mean']):.2f}); the constant-LR raw model "
        f"at {const['mean']:.4f} (ppl {math.exp(const['mean']):.2f}), {const['delta']:+.4f} vs cosine (paired mean). "
        + (
            "Decaying the learning rate matters here."
            if const["delta"] > 0
            else "The constant-LR raw model is not worse than cosine: this setting shows nothing about decay."
        )
    ]
    families = (("ema-", "EMA"), ("bema", "BEMA"), ("merge-", "checkpoint merge"), ("posthoc-", "post-hoc EMA"))
    for family, name in families:
        cands = [s for s in summary if s["method"].startswith(family)]
        if not cands:
            continue
        best = min(cands, key=lambda s: s["mean"])
        reach = [s for s in cands if s["delta"] <= 0]
        closes = (
            f", recovering {1 - best['delta'] / const['delta']:.0%} of the constant-vs-cosine gap (over 100%: better "
            "than cosine)"
            if const["delta"] > 0
            else ""
        )
        lines.append(
            f"- Best {name}: {describe(best['method'], cfg)} at {best['mean']:.4f} ± {best['std']:.4f}, "
            f"{best['delta']:+.4f} vs cosine (paired; at or below cosine in {best['wins']}/{best['n']} seeds){closes}. "
            + (
                "On average at or below cosine: " + ", ".join(describe(s["method"], cfg) for s in reach) + "."
                if reach
                else f"No {name} setting reaches cosine on average."
            )
        )
        worse = [s for s in cands if s["mean"] > const["mean"]]
        if worse:
            lines.append(
                f"- {name[0].upper() + name[1:]} worse than the raw constant-LR model: "
                + ", ".join(describe(s["method"], cfg) for s in worse)
            )
    return lines


def curve_methods(cfg: ExperimentConfig, rows: list[dict]) -> list[str]:
    """The methods evaluated at every checkpoint (the curves of the plot and the per-step table)."""
    present = set(_methods(rows))
    wanted = ["cosine", "constant", *(ema_method(d) for d in sorted(cfg.ema_decays)), BEMA_METHOD, BEMA_PLAIN_METHOD]
    wanted += [merge_method(s, cfg.curve_window) for s in cfg.merge_schedules]
    return [m for m in wanted if m in present]


def render_markdown(rows: list[dict], cfg: ExperimentConfig, meta: dict[str, Any]) -> str:
    summary = sorted(summarize(rows, cfg), key=lambda s: s["mean"])
    n_seeds = len(cfg.seeds)
    lines = [
        f"<!-- generated by examples/experiments/{NAME}.py; do not edit by hand -->",
        f"Tiny Llama ({meta.get('n_params', '?'):,} parameters: hidden {cfg.hidden_size}, {cfg.num_layers} layers), "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.block_size} tokens, AdamW at {cfg.learning_rate:g} after "
        f"{cfg.warmup_steps} warmup steps, checkpoints every {cfg.save_every} steps, eval on {cfg.eval_blocks} fixed "
        f"held-out blocks, seeds {cfg.seeds}. Wall time {meta.get('wall_s', float('nan')):.0f} s "
        f"(training {meta.get('train_s', float('nan')):.0f} s of it, as the runs recorded it when trained) "
        f"({meta.get('threads', cfg.threads)} torch thread(s), {meta.get('cpus', '?')} CPUs).",
        "",
        f"### Eval loss at the last step ({cfg.steps}), {n_seeds} seeds",
        "",
        "| method | eval loss (mean ± std) | min – max | ppl | vs cosine (paired) | seeds ≤ cosine | first step ≤ cosine's final |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        first = s["first_step"] if s["first_step"] is not None else "never"
        if not s["every_step"]:
            first = f"{first} (last step only)" if s["first_step"] is not None else "never (last step only)"
        lines.append(
            f"| {describe(s['method'], cfg)} | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} – {s['max']:.4f} | "
            f"{math.exp(s['mean']):.2f} | {s['delta']:+.4f} | {s['wins']}/{s['n']} | {first} |"
        )
    lines += ["", "### Summary (computed from the table)", "", *_verdict(summary, cfg), ""]
    methods = curve_methods(cfg, rows)
    lines += [
        f"### Eval loss at every checkpoint (mean over {n_seeds} seeds)",
        "",
        "| step | " + " | ".join(describe(m, cfg) for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for step in cfg.checkpoint_steps:
        cells = []
        for m in methods:
            v = _losses(rows, m, step)
            cells.append(f"{statistics.fmean(v.values()):.4f}" if v else "–")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_plot(rows: list[dict], cfg: ExperimentConfig, path: Path) -> None:
    """Left: eval loss over steps (seed mean, min–max band); right: every method at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = curve_methods(cfg, rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.6), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = {"cosine": "black", "constant": "tab:red", BEMA_METHOD: "tab:cyan", BEMA_PLAIN_METHOD: "teal"}
    blues = plt.cm.Blues([0.45 + 0.5 * i / max(1, len(cfg.ema_decays) - 1) for i in range(len(cfg.ema_decays))])
    for decay, c in zip(sorted(cfg.ema_decays), blues):
        colors[ema_method(decay)] = c
    for schedule, c in zip(cfg.merge_schedules, ["tab:green", "tab:olive", "tab:orange", "tab:brown"]):
        colors[merge_method(schedule, cfg.curve_window)] = c
    for sigma, c in zip(cfg.posthoc_sigma_rels, ["tab:purple", "tab:pink", "tab:gray"]):
        colors[posthoc_method(sigma)] = c
    # Zoom on the last two thirds, framed by the two raw runs: the early steps (and any EMA far above them) would
    # otherwise squash the differences that matter; every final value is in the right panel anyway.
    start = cfg.steps // 3
    low, high = math.inf, -math.inf
    for m in methods:
        steps = [s for s in cfg.checkpoint_steps if _losses(rows, m, s)]
        vals = [list(_losses(rows, m, s).values()) for s in steps]
        mean = [statistics.fmean(v) for v in vals]
        style = "-" if m in ("cosine", "constant", BEMA_METHOD) else ("--" if m.startswith("merge") else ":")
        ax.plot(steps, mean, style, color=colors.get(m), label=describe(m, cfg), lw=2 if m == "cosine" else 1.5)
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=colors.get(m), alpha=0.12)
        low = min(low, *(min(v) for s, v in zip(steps, vals) if s >= start))
        if m in ("cosine", "constant"):
            high = max(high, *(max(v) for s, v in zip(steps, vals) if s >= start))
    ax.set_xlim(start - cfg.save_every / 2, cfg.steps + cfg.save_every / 4)
    ax.set_ylim(low - 0.03 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel(f"optimizer step (from {start}; warmup {cfg.warmup_steps}, EMAs start after it)")
    ax.set_ylabel("eval loss (held-out docs)")
    ax.set_title(f"Eval loss over training: mean of {len(cfg.seeds)} seeds, band = min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")

    summary = sorted(summarize(rows, cfg), key=lambda s: s["mean"], reverse=True)
    ys = range(len(summary))
    for y, s in zip(ys, summary):
        color = colors.get(s["method"], "gray")
        if s["method"].startswith("merge-"):
            # Every window of one schedule in that schedule's colour.
            color = colors.get(merge_method(s["method"][6:].rpartition("-k")[0], cfg.curve_window), color)
        ax2.errorbar(
            s["mean"], y, xerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="o", color=color, capsize=3
        )
    cos = next(s for s in summary if s["method"] == "cosine")
    ax2.axvline(cos["mean"], color="black", lw=1, ls="--")
    ax2.set_yticks(list(ys), [describe(s["method"], cfg) for s in summary], fontsize=7)
    ax2.set_xlabel(f"eval loss at step {cfg.steps} (dot: mean, bar: min–max over seeds)")
    ax2.set_title("Last step; dashed: cosine decay")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    # A 256-colour palette PNG is a third of the size and looks the same (the docs commit this file).
    from PIL import Image

    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def write_report(rows: list[dict], cfg: ExperimentConfig, meta: dict[str, Any], report_dir: Path) -> dict[str, Path]:
    """Write `<report_dir>/constant_lr_vs_decay.{md,csv}` and `<report_dir>/images/constant_lr_vs_decay.png`."""
    paths = {
        "table": report_dir / f"{NAME}.md",
        "csv": report_dir / f"{NAME}.csv",
        "plot": report_dir / "images" / f"{NAME}.png",
    }
    write_csv(rows, paths["csv"])
    paths["table"].write_text(render_markdown(rows, cfg, meta), encoding="utf-8")
    render_plot(rows, cfg, paths["plot"])
    return paths


# ---------------------------------------------------------------------------------------------- command line
QUICK = {
    "seeds": [0],
    "steps": 8,
    "warmup_steps": 2,
    "save_every": 2,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "batch_size": 4,
    "block_size": 32,
    "vocab_size": 300,
    "eval_blocks": 8,
    "ema_decays": [0.9, 0.5],
    "merge_windows": [2, 3],
    "curve_window": 2,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / NAME, help="run folder (checkpoints, results.csv)")
    parser.add_argument("--report-dir", type=Path, help="where the table, CSV and plot go (default: --out)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke-test version (1 seed, 8 steps)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--save-every", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--ema-decays", type=float, nargs="+")
    parser.add_argument("--merge-windows", type=int, nargs="+")
    parser.add_argument("--curve-window", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--force", action="store_true", help="retrain even when finished runs are found")
    parser.add_argument("--render-only", action="store_true", help="redraw table and plot from --out/results.csv")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    values = dict(QUICK) if args.quick else {}
    for f in dataclasses.fields(ExperimentConfig):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return ExperimentConfig(**values)


def _markers(out_dir: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    paths = [out_dir / f"seed-{seed}" / run / "done.json" for seed in cfg.seeds for run in SCHEDULE_RUNS]
    return [{"mtime": p.stat().st_mtime, **json.loads(p.read_text())} for p in paths if p.is_file()]


def training_s(out_dir: Path, cfg: ExperimentConfig) -> float:
    """The training time of every run, as each recorded it when it was trained."""
    return sum(float(m.get("train_runtime_s") or 0.0) for m in _markers(out_dir, cfg))


def reused_training_s(out_dir: Path, cfg: ExperimentConfig, start: float) -> float:
    """The recorded training time of the runs this invocation reused (finished before it started)."""
    started = time.time() - (time.perf_counter() - start)
    return sum(float(m.get("train_runtime_s") or 0.0) for m in _markers(out_dir, cfg) if m["mtime"] < started)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out
    report_dir = args.report_dir or out_dir
    if args.render_only:
        meta = json.loads((out_dir / "experiment.json").read_text())
        cfg = ExperimentConfig(**meta.pop("config"))
        rows = read_csv(out_dir / "results.csv")
    else:
        cfg = config_from_args(args)
        start = time.perf_counter()
        rows, n_params = run_experiment(cfg, out_dir, progress=not args.no_progress, force=args.force)
        meta = {
            # Finished runs are reused: their own recorded training time counts, not the time to skip them.
            "wall_s": time.perf_counter() - start + reused_training_s(out_dir, cfg, start),
            "train_s": training_s(out_dir, cfg),
            "threads": cfg.threads,
            "cpus": os.cpu_count(),
            "n_params": n_params,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
        write_csv(rows, out_dir / "results.csv")
        (out_dir / "experiment.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **meta}, indent=2))
    paths = write_report(rows, cfg, meta, report_dir)
    print(paths["table"].read_text(encoding="utf-8"))
    print(f"wall time {meta['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

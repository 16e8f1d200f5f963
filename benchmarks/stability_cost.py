"""Cost of `EMACallback(stability_metrics=...)` as a share of the Trainer's step time, on a small Llama.

Two measurements, side by side in one run:

1. Instrumented: the time spent inside the stability code (the per-step oscillation update and the per-log
   relative distance + summary), divided by the training time of the same run. Precise even on a busy machine.
2. A/B: the mean step time of runs without and with the stability metrics, alternated `--repeats` times (noisy
   on a shared CPU; read it as a sanity check of 1).

    python benchmarks/stability_cost.py                 # CPU (1 thread), hidden 128, 4 layers, 60 steps
    python benchmarks/stability_cost.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_ema import EMACallback
from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer
from hf_ema.stability import StabilityMonitor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _docs_page import DocsPage, default_path  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from `on_step_begin` to the end of every `on_step_end` callback."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


class Instrumented(StabilityMonitor):
    """A `StabilityMonitor` that times its own calls."""

    step_seconds = 0.0
    metrics_seconds = 0.0
    metrics_calls = 0

    def step(self, ema) -> None:
        start = time.perf_counter()
        super().step(ema)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        Instrumented.step_seconds += time.perf_counter() - start

    def metrics(self, ema) -> dict[str, float]:
        start = time.perf_counter()
        out = super().metrics(ema)
        Instrumented.metrics_seconds += time.perf_counter() - start
        Instrumented.metrics_calls += 1
        return out


def run_once(data, tokenizer, args_ns, stability: bool, logging_steps: int) -> tuple[float, StepTimer]:
    train_ds, _ = data
    model = tiny_causal_lm(
        tokenizer, hidden_size=args_ns.hidden, num_layers=args_ns.layers, num_heads=4, seed=0, max_positions=512
    )
    args = TrainingArguments(
        output_dir="/tmp/hf_ema_stability_cost",
        max_steps=args_ns.steps,
        per_device_train_batch_size=args_ns.batch,
        learning_rate=1e-3,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=args_ns.device == "cpu",
        disable_tqdm=True,
    )
    callback = EMACallback(decay=0.999, stability_metrics=stability)
    if stability:
        callback.stability = Instrumented(callback.stability.config)
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=[callback, timer])
    trainer.train()
    warm = timer.times[args_ns.warmup :]
    return statistics.mean(warm), timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the means")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--page", default=default_path("stability_cost"), help="results page to write ('' for none)")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    page = DocsPage(
        "stability_cost",
        "Cost of the stability metrics",
        intro=(
            "Two measurements of `EMACallback(stability_metrics=...)` on a small Llama, side by side in one run. "
            "Instrumented: the time spent inside the stability code (the per-step oscillation update and the per-log "
            "relative distance + summary) over the mean Trainer step time, precise even on a busy machine. A/B: the "
            "mean step time of runs without and with the metrics, alternated (noisy on a shared CPU: a sanity check "
            "of the first)."
        ),
    )
    tokenizer = train_tokenizer(vocab_size=1024)
    data = lm_datasets(tokenizer, block_size=ns.block)
    n_params = sum(
        p.numel() for p in tiny_causal_lm(tokenizer, hidden_size=ns.hidden, num_layers=ns.layers).parameters()
    )
    page.add(
        f"model: Llama hidden {ns.hidden}, {ns.layers} layers, {n_params / 1e6:.2f}M params; batch {ns.batch}x{ns.block}"
    )
    page.add("")
    page.add(f"device: {ns.device}, torch threads {torch.get_num_threads()}, {ns.steps} steps per run")

    # 1. Instrumented, logging every step (worst case for the per-log part).
    Instrumented.step_seconds = Instrumented.metrics_seconds = 0.0
    Instrumented.metrics_calls = 0
    step_mean, timer = run_once(data, tokenizer, ns, stability=True, logging_steps=1)
    total = sum(timer.times)
    per_update = Instrumented.step_seconds / len(timer.times)
    per_log = Instrumented.metrics_seconds / max(Instrumented.metrics_calls, 1)
    page.add("")
    page.add("| part | time | % of mean step time |")
    page.add("|---|---|---|")
    page.add(f"| Trainer step (with EMA + stability) | {1e3 * step_mean:.2f} ms | 100% |")
    page.add(f"| oscillation update, every step | {1e3 * per_update:.3f} ms | {100 * per_update / step_mean:.3f}% |")
    page.add(f"| relative distance + summary, per log | {1e3 * per_log:.3f} ms | {100 * per_log / step_mean:.3f}% |")
    for every in (1, 10, 500):
        share = (per_update + per_log / every) / step_mean
        page.add(
            f"| total at logging_steps={every} | {1e3 * (per_update + per_log / every):.3f} ms | {100 * share:.3f}% |"
        )
    page.add("")
    page.add(
        f"(instrumented share of this run's step time: {100 * (Instrumented.step_seconds + Instrumented.metrics_seconds) / total:.3f}%)"
    )

    # 2. A/B, alternating, logging every 10 steps.
    off, on = [], []
    for _ in range(ns.repeats):
        off.append(run_once(data, tokenizer, ns, stability=False, logging_steps=10)[0])
        on.append(run_once(data, tokenizer, ns, stability=True, logging_steps=10)[0])
    page.add("")
    page.add("| A/B, logging_steps=10 | mean step time | ratio |")
    page.add("|---|---|---|")
    base = statistics.median(off)
    page.add(f"| EMA only | {1e3 * base:.2f} ms | 1.000 |")
    page.add(
        f"| EMA + stability_metrics | {1e3 * statistics.median(on):.2f} ms | {statistics.median(on) / base:.3f} |"
    )

    page.write(ns.page)


if __name__ == "__main__":
    main()

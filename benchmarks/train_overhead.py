"""Trainer throughput with an EMA updated every optimizer step, against no EMA and the anchors, in one run.

    python benchmarks/train_overhead.py                  # small Llama, 40 steps per run, 3 interleaved rounds
    python benchmarks/train_overhead.py --steps 20 --rounds 2

Every configuration trains the same model from the same seed (so the weights follow the same trajectory) with
`Trainer` on CPU; the EMA is driven by `EMACallback` (hf-ema) or by a minimal callback calling the anchor's update
after each optimizer step. Throughput is 1 / the median time between the ends of consecutive optimizer steps (after
`--warmup` steps), so a burst of load from another process on a shared machine moves it little; the table gives the
median over `--rounds` rounds in which the configurations run one after the other. On a shared machine the
run-to-run noise of that throughput (several %) exceeds the EMA's cost, so the table also gives the direct
measure: the mean time spent in the EMA's step hook (the update) over the median step time.

The `update_every` rows also report what skipping updates costs in quality: the relative distance between their
EMA and the every-step EMA (normalised by the distance between the every-step EMA and the raw weights), and the
eval loss of each EMA.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anchors as A  # noqa: E402
from _docs_page import DocsPage, default_path  # noqa: E402

from hf_ema import EMACallback  # noqa: E402
from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer  # noqa: E402


class StepClock(TrainerCallback):
    """Time at the end of each optimizer step (registered last, so the EMA update is included)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


class AnchorCallback(TrainerCallback):
    """The minimal wiring of a third-party EMA: build it at train start, update it after every optimizer step."""

    def __init__(self, builder):
        self.builder = builder
        self.impl = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.impl = self.builder(model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.impl is not None:  # None: the library is not installed (its row says so)
            self.impl.update()


def configs(decay: float):
    out = {
        "no EMA": lambda: None,
        "hf-ema, every step": lambda: EMACallback(decay=decay, save_final=False),
        "hf-ema, offloaded (device=cpu, async_update)": lambda: EMACallback(
            decay=decay, device="cpu", async_update=True, save_final=False
        ),
        "hf-ema, update_every=4": lambda: EMACallback(decay=decay, update_every=4, save_final=False),
        # BEMA: the same update with BEMA's schedule; the correction is formed only when the EMA is used.
        "hf-ema, BEMA (bema=True)": lambda: EMACallback(bema=True, save_final=False),
        "hf-ema, update_every=16": lambda: EMACallback(decay=decay, update_every=16, save_final=False),
    }
    for key, builder in A.ANCHORS.items():
        if key in ("diffusers_loop", "ema_pytorch_loop", "classic"):
            continue  # the slower variants of the same libraries
        out[f"anchor: {key}"] = lambda b=builder: AnchorCallback(lambda m: A.safe_build(b, m))
    return out


def run_once(make_callback, tok, train_ds, args, out_dir):
    model = tiny_causal_lm(
        tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, seed=0, tie_word_embeddings=True
    )
    callback = make_callback()
    clock = StepClock()
    in_callback: list[float] = []
    if callback is not None:
        # Time spent in the EMA's own step hook: a direct, noise-robust measure of its share of the step.
        inner = callback.on_step_end

        def timed_step_end(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            in_callback.append(time.perf_counter() - t0)
            return out

        callback.on_step_end = timed_step_end
    callbacks = ([callback] if callback is not None else []) + [clock]
    targs = TrainingArguments(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=10_000,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks)
    trainer.train()
    t = clock.times
    # 1 / median step time: a burst of load from another process slows a few steps, not the median.
    step_s = statistics.median(b - a for a, b in zip(t[args.warmup :], t[args.warmup + 1 :]))
    steps_per_s = 1.0 / step_s
    # Mean, not median: with update_every the hook is cheap on most steps and pays on a few.
    ema_share = statistics.fmean(in_callback[args.warmup :]) / step_s if in_callback else 0.0
    ema_state = None
    if isinstance(callback, EMACallback):
        callback.ema.wait()
        ema_state = {k: v.detach().clone() for k, v in callback.ema.state_dict()["tensors"].items()}
        ema_state["__bytes__"] = callback.ema.num_bytes()
        callback.ema.close()
    elif isinstance(callback, AnchorCallback) and callback.impl is None:
        steps_per_s = None  # library not installed
    return steps_per_s, ema_state, model, ema_share


def print_bema_cost(speeds: dict[str, list[float]], states: dict[str, dict]) -> None:
    """BEMA against the plain EMA of the same run: step time, and the memory its snapshot theta_0 adds."""
    plain, bema = "hf-ema, every step", "hf-ema, BEMA (bema=True)"
    if not speeds.get(plain) or not speeds.get(bema):
        return
    ratio = statistics.median(speeds[plain]) / statistics.median(speeds[bema])
    extra = states[bema]["__bytes__"] - states[plain]["__bytes__"]
    fp32_copy = sum(v.numel() * 4 for n, v in states[plain].items() if n != "__bytes__" and v.is_floating_point())
    print(
        f"\nBEMA's step time over the plain EMA's, same run: **{ratio:.3f}** (target: at most 1.05). Memory: BEMA "
        f"adds {extra / 2**20:.2f} MiB (theta_0, one copy of the averaged weights in their dtype, here fp32: "
        f"{fp32_copy / 2**20:.2f} MiB)."
    )


@torch.no_grad()
def eval_loss(model, state, eval_ds, n=32):
    if state is not None:
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)
    model.eval()
    ids = eval_ds.input_ids[:n]
    return model(input_ids=ids, labels=ids).loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--decay", type=float, default=0.95)
    parser.add_argument("--only", default=None, help="comma-separated substrings: run only matching configurations")
    parser.add_argument("--page", default=default_path("train_overhead"), help="results page to write ('' for none)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    tok = train_tokenizer(vocab_size=args.vocab)
    train_ds, eval_ds = lm_datasets(tok, block_size=args.block, max_train_blocks=args.batch * args.steps)
    todo = configs(args.decay)
    if args.only:
        keep = args.only.split(",")
        todo = {k: v for k, v in todo.items() if k == "no EMA" or any(x in k for x in keep)}
    speeds: dict[str, list[float]] = {k: [] for k in todo}
    shares: dict[str, list[float]] = {k: [] for k in todo}
    states: dict[str, dict] = {}
    final_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, make in todo.items():
                sps, state, model, share = run_once(make, tok, train_ds, args, os.path.join(tmp, "run"))
                if sps is not None:
                    speeds[name].append(sps)
                    shares[name].append(share)
                if state is not None and r == 0:
                    states[name] = state
                if name == "no EMA" and r == 0:
                    final_model = model
                gc.collect()
    n_params = sum(p.numel() for p in final_model.parameters())
    raw = {n: p.detach().clone() for n, p in final_model.named_parameters()}
    base = statistics.median(speeds["no EMA"])
    page = DocsPage(
        "train_overhead",
        "Trainer throughput with an EMA",
        intro=(
            "Every configuration trains the same model from the same seed with `Trainer` on CPU; the EMA is driven by "
            "`EMACallback` (hf-ema) or by a minimal callback calling another library's update after each optimizer "
            "step. Throughput is 1 / the median time between the ends of consecutive optimizer steps; the last "
            "column, the mean time spent in the EMA's step hook over the median step time, is the direct measure of "
            "the EMA's cost (throughput ratios move by several percent between identical runs on a shared CPU). The "
            "second table gives what skipping updates (`update_every`) costs in quality on the same trajectory."
        ),
    )
    with page.capture():
        print(
            f"\n### Trainer throughput, Llama {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), "
            f"batch {args.batch}x{args.block} tokens, fp32, {args.steps} steps (median step time after step {args.warmup}), "
            f"median of {args.rounds} rounds, decay {args.decay}\n"
        )
        print("| configuration | steps/s | throughput vs no EMA | time in the EMA step hook / step time |")
        print("|---|---:|---:|---:|")
        for name in todo:
            if not speeds[name]:
                print(f"| {name} | not installed | | |")
                continue
            s = statistics.median(speeds[name])
            share = statistics.median(shares[name])
            print(f"| {name} | {s:.2f} | {s / base:.3f} | {100 * share:.2f}% |")
        print_bema_cost(speeds, states)

        ref = states.get("hf-ema, every step")
        if ref is not None:
            ref = {n: v for n, v in ref.items() if n != "__bytes__"}
            print("\n### update_every: quality of the EMA at the end of the run (same training trajectory)\n")
            print("| configuration | rel. distance to every-step EMA | eval loss of the EMA |")
            print("|---|---:|---:|")
            spread = sum(((ref[n] - raw[n]) ** 2).sum().item() for n in raw if n in ref) ** 0.5
            for name, state in states.items():
                if "BEMA" in name:
                    continue  # another average, not an approximation of the every-step EMA (its own table above)
                state = {n: v for n, v in state.items() if n != "__bytes__"}
                if "offloaded" in name and all(torch.equal(state[n], ref[n]) for n in ref):
                    print(f"| {name} | 0 (bit-identical) | |")
                    continue
                dist = sum(((state[n] - ref[n]) ** 2).sum().item() for n in raw if n in ref) ** 0.5
                print(f"| {name} | {dist / spread:.4f} | {eval_loss(final_model, state, eval_ds):.4f} |")
            print(f"| raw weights (no EMA) | {1.0:.4f} | {eval_loss(final_model, raw, eval_ds):.4f} |")
    page.write(args.page, argv)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()

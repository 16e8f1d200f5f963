"""Worked example on the offline tiny model: checkpoint merging (mean / EMA / WSM) and post-hoc EMA widths.

Trains the demo's tiny Llama (hf_ema.demo.toy, no download) at a constant learning rate with
`EMACallback(decay=..., posthoc=...)`, then evaluates on held-out text, side by side in one run:
the raw final weights, the main EMA, merges of the last checkpoints, and post-hoc EMAs reconstructed for several
`sigma_rel` (the two tracked profiles are 0.05 and 0.10; the others are reconstructed).

Usage:
    python benchmarks/tiny_merge_posthoc.py [--output-dir runs/tiny-posthoc] [--max-steps 300] [--window 5]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _docs_page import DocsPage, default_path  # noqa: E402


def eval_loss(model, eval_ds, batch_size: int = 32) -> float:
    """Mean token loss of a causal LM over the eval blocks."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ds), batch_size):
            ids = eval_ds[i : i + batch_size]["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * len(ids)
            count += len(ids)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/tiny-posthoc")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=30)
    parser.add_argument("--snapshot-every", type=int, default=30)
    parser.add_argument("--window", type=int, default=5, help="checkpoints merged (the last ones)")
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument(
        "--page", default=default_path("tiny_merge_posthoc"), help="results page to write ('' for none)"
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_ema import EMACallback, PostHocConfig, merge_checkpoints, reconstruct
    from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer

    torch.manual_seed(0)
    out = Path(args.output_dir)
    tokenizer = train_tokenizer()
    train_ds, eval_ds = lm_datasets(tokenizer, block_size=64)
    start = time.perf_counter()
    if not (out / "ema" / "config.json").is_file():
        model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4, num_heads=4, seed=0)
        training_args = TrainingArguments(
            output_dir=str(out),
            max_steps=args.max_steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            lr_scheduler_type="constant_with_warmup",  # WSM's setting: no decay, the merge emulates it
            warmup_steps=20,
            logging_steps=50,
            save_steps=args.save_steps,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        callback = EMACallback(
            decay=args.decay, eval_ema=False, posthoc=PostHocConfig(snapshot_every=args.snapshot_every)
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=train_ds, processing_class=tokenizer, callbacks=[callback]
        )
        trainer.train()
        trainer.save_model()
    print(f"trained in {time.perf_counter() - start:.0f}s: {out}")

    rows: list[tuple[str, float]] = []
    rows.append(("raw final weights", eval_loss(AutoModelForCausalLM.from_pretrained(out), eval_ds)))
    rows.append((f"EMA decay {args.decay}", eval_loss(AutoModelForCausalLM.from_pretrained(out / "ema"), eval_ds)))
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-args.window :]
    span = f"{checkpoints[0].name.split('-')[1]}-{checkpoints[-1].name.split('-')[1]}"
    for label, kwargs in [
        ("mean", {}),
        ("ema 0.5", {"method": "ema"}),
        ("wsm cosine", {"method": "wsm", "schedule": "cosine"}),
        ("wsm 1-sqrt", {"method": "wsm", "schedule": "1-sqrt"}),
    ]:
        folder = merge_checkpoints(
            checkpoints, out / f"merged-{label.replace(' ', '-')}", overwrite=True, progress=False, **kwargs
        )
        rows.append((f"merge {label} ({span})", eval_loss(AutoModelForCausalLM.from_pretrained(folder), eval_ds)))
    for sigma_rel in (0.03, 0.05, 0.08, 0.10, 0.15, 0.20, 0.25):
        folder = reconstruct(out, sigma_rel, out / f"posthoc-{sigma_rel:g}", overwrite=True, progress=False)
        rows.append(
            (f"post-hoc sigma_rel {sigma_rel:g}", eval_loss(AutoModelForCausalLM.from_pretrained(folder), eval_ds))
        )

    raw = rows[0][1]
    page = DocsPage(
        "tiny_merge_posthoc",
        "Checkpoint merging and post-hoc EMA on the tiny model",
        intro=(
            f"The demo's tiny Llama (4 layers, hidden 128, no download) trained for {args.max_steps} steps at a "
            "constant learning rate (2e-3 after 20 warmup steps, WSM's setting) with "
            f"`EMACallback(decay={args.decay}, posthoc=PostHocConfig(snapshot_every={args.snapshot_every}))`, "
            f"checkpoints every {args.save_steps} steps, then evaluated on held-out text: the raw weights, the EMA, "
            f"merges of the last {args.window} checkpoints and post-hoc EMAs of several widths (0.05 and 0.10 are the "
            "two tracked profiles; the others are reconstructed)."
        ),
    )
    page.add("\n| weights | eval loss | ppl | vs raw |")
    page.add("| --- | ---: | ---: | ---: |")
    for label, loss in rows:
        page.add(f"| {label} | {loss:.4f} | {math.exp(loss):.2f} | {loss - raw:+.4f} |")
    page.write(args.page)


if __name__ == "__main__":
    main()

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
import time
from pathlib import Path


def eval_loss(model, eval_ds, batch_size: int = 32) -> float:
    """Mean token loss of a causal LM over the eval blocks."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ds), batch_size):
            ids = torch.tensor(eval_ds[i : i + batch_size]["input_ids"])
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
    print(f"\n{'weights':<34}{'eval loss':>10}{'ppl':>9}{'vs raw':>9}")
    for label, loss in rows:
        print(f"{label:<34}{loss:>10.4f}{math.exp(loss):>9.2f}{loss - raw:>+9.4f}")


if __name__ == "__main__":
    main()

"""Post-hoc EMA with an update interval: hf-ema against ema-pytorch's `PostHocEMA` on a linearly drifting weight.

One weight equals the step number (1, 2, ..., 20000). Both libraries track power-function EMAs of sigma_rel 0.05 and
0.28 (ema-pytorch's defaults), snapshot every 1000 steps, and synthesize sigma_rel 0.10 at step 20000, with an
update every 1 and every 100 steps (ema-pytorch's default). The ideal value is the power-function EMA of the
trajectory computed directly with the discrete update (for an update every 100 steps: sampled every 100 steps).
Needs `pip install ema-pytorch` (the `bench` extra).

Usage:
    python benchmarks/posthoc_vs_ema_pytorch.py [--steps 20000] [--snapshot-every 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _docs_page import DocsPage, default_path  # noqa: E402


def ideal(steps: int, gamma: float, every: int) -> float:
    ema = None
    for s in range(every, steps + 1, every):
        beta = (1 - every / s) ** (gamma + 1)
        ema = float(s) if ema is None else beta * ema + (1 - beta) * s
    return ema


def run_ema_pytorch(steps: int, every: int, snapshot_every: int, folder: Path) -> float:
    import torch
    from ema_pytorch import PostHocEMA

    model = torch.nn.Linear(1, 1, bias=False)
    phema = PostHocEMA(
        model,
        sigma_rels=(0.05, 0.28),
        update_every=every,
        checkpoint_every_num_steps=snapshot_every,
        checkpoint_folder=str(folder),
        checkpoint_dtype=torch.float32,  # fp32 so that only the profile math differs (its default is fp16)
    )
    for s in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(s))
        phema.update()
    synth = phema.synthesize_ema_model(sigma_rel=0.10)
    return next(p for p in synth.ema_model.parameters()).item()


def run_hf_ema(steps: int, every: int, snapshot_every: int, folder: Path) -> float:
    import torch
    from safetensors.torch import load_file

    from hf_ema import PostHocConfig, PostHocEMA, reconstruct

    model = torch.nn.Linear(1, 1, bias=False)
    phema = PostHocEMA(model, PostHocConfig(sigma_rels=(0.05, 0.28), update_every=every))
    for s in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(s))
        phema.update(s)
        if s % snapshot_every == 0:
            phema.snapshot(folder / "ema_posthoc")
    out = reconstruct(folder, sigma_rel=0.10, out_dir=folder / "rec", progress=False)
    return load_file(str(out / "model.safetensors"))["weight"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--snapshot-every", type=int, default=1000)
    parser.add_argument(
        "--page", default=default_path("posthoc_vs_ema_pytorch"), help="results page to write ('' for none)"
    )
    args = parser.parse_args()
    from importlib.metadata import version

    from hf_ema.decay import gamma_from_sigma_rel

    gamma = gamma_from_sigma_rel(0.10)
    page = DocsPage(
        "posthoc_vs_ema_pytorch",
        "Post-hoc EMA with an update interval",
        intro=(
            "One weight drifts linearly (weight = step). hf-ema and ema-pytorch's `PostHocEMA` both track "
            "power-function EMAs of `sigma_rel` 0.05 and 0.28 (ema-pytorch's defaults), snapshot them in fp32, and "
            "synthesize `sigma_rel` 0.10 at the last step, with an update every step and every 100 steps "
            "(ema-pytorch's default). The ideal value is the power-function EMA of the trajectory computed directly "
            "with the discrete update; the relative error is in parentheses."
        ),
    )
    page.add(
        f"\n`sigma_rel` 0.10 synthesized from 0.05 / 0.28 at step {args.steps}, snapshots every "
        f"{args.snapshot_every} steps:\n"
    )
    page.add(f"| `update_every` | ideal (direct discrete EMA) | hf-ema | ema-pytorch {version('ema-pytorch')} |")
    page.add("| ---: | ---: | ---: | ---: |")
    for every in (1, 100):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            want = ideal(args.steps, gamma, every)
            ours = run_hf_ema(args.steps, every, args.snapshot_every, Path(a))
            theirs = run_ema_pytorch(args.steps, every, args.snapshot_every, Path(b))
        page.add(
            f"| {every} | {want:.1f} | {ours:.1f} ({(ours - want) / want:.1e}) | {theirs:.1f} "
            f"({(theirs - want) / want:.1e}) |"
        )
    page.write(args.page)


if __name__ == "__main__":
    main()

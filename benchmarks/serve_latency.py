"""Latency of one app request for 1, 2 and 4 weight variants (full model and LoRA), and the batching alternatives.

One request is what the app's Generate button runs (`serve.compare.compare`): greedy decoding of every pane from
the same prompt, then the score matrix (every text under every model) and the token views. The variants are the
panes the issue asks for: 1 = raw; 2 = raw + EMA; 4 = raw + EMA + post-hoc EMA sigma_rel=0.15 + mean of the last 3
checkpoints, on short real runs of the demo model (`hf_ema.demo.train_tiny_run`, post-hoc snapshots on) trained
first. Every variant is built (reconstructed, merged, loaded, stacked) before timing; the figures are the p50 of
interleaved rounds (1, 2, 4, 1, 2, 4...), so a slow spell of the machine hits every case alike.

For full models the app runs the variants as one stacked model (`serve.batching.stack_models`, linear layers as
one batched matmul, q/k/v and gate/up fused, `weight @ x` at decoding steps), and takes the score matrix's diagonal
from the decoding logits; the alternatives measured in the same run, through the same request path, are: the stacked
model with each variant's own linear layer on its rows (`linear="per-variant"`, no weight copy), one forward pass
per variant (`SequentialVariants`), and `torch.func.stack_module_state` + `functional_call` under `vmap` (which
cannot grow a KV cache under `vmap`, so it recomputes the whole prefix at each token).

Reading the figures: LoRA variants share the base model, so a batch of them reads the base weights once per token
and the extra variants cost little. Full-model variants each bring their own weights: at the demo model's size the
decoding step is bound by reading the weights (the batched matmul reads four sets instead of one), and the score
matrix grows as the square of the number of panes (4 texts under 4 models: 12 scored sequences besides the
diagonal the decoding already gave).

Usage:
    python benchmarks/serve_latency.py [--output-dir runs/serve-latency] [--rounds 15] [--max-new-tokens 64]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the app's `serve` package
from _docs_page import DocsPage, default_path  # noqa: E402

PROMPT = "The for statement"
VARIANTS = {
    1: ["raw"],
    2: ["raw", "ema"],
    4: ["raw", "ema", "posthoc:0.15", "merge:mean:3"],
}


def vmap_batch_class():
    """A `VariantBatch` running stacked weights with `torch.func.functional_call` under `vmap`, without KV cache."""
    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from serve.batching import VariantBatch

    class VmapVariants(VariantBatch):
        def __init__(self, models) -> None:
            super().__init__(len(models), models[0])
            self.params, self.buffers = stack_module_state(models)
            self.base = models[0]

        def new_cache(self):
            return []  # the token history: a KV cache cannot grow inside vmap, so each step recomputes the prefix

        @torch.inference_mode()
        def forward(self, input_ids, cache=None, *, last_only=False):
            if cache is not None:
                cache.append(input_ids)
                input_ids = torch.cat(cache, dim=1)
            blocks = input_ids.reshape(self.n, -1, input_ids.shape[1])

            def one(params, buffers, ids):
                return functional_call(self.base, (params, buffers), (), {"input_ids": ids, "use_cache": False}).logits

            logits = vmap(one)(self.params, self.buffers, blocks)
            logits = logits.reshape(-1, *logits.shape[2:])
            return logits[:, -1:] if last_only else logits

    return VmapVariants


def timed_store(catalog, how: str):
    """A VariantStore whose batches are built the way `how` says (`app`, `per-variant`, `sequential`, `vmap`)."""
    from serve.batching import SequentialVariants, make_variant_batch
    from serve.variants import VariantStore

    class Store(VariantStore):
        def __init__(self, catalog) -> None:
            super().__init__(catalog)
            self.built: dict = {}

        def batch(self, checkpoint, variants):
            if how == "app" or len(variants) == 1 or catalog.get(checkpoint).is_peft:
                return super().batch(checkpoint, variants)
            key = (how, tuple(id(v.model) for v in variants))
            if key not in self.built:
                models = [v.model for v in variants]
                if how == "per-variant":
                    self.built[key] = make_variant_batch(models, linear="per-variant")
                elif how == "sequential":
                    self.built[key] = SequentialVariants(models)
                else:
                    self.built[key] = vmap_batch_class()(models)
            return self.built[key]

    return Store(catalog)


def measure(stores: dict, rounds: int, max_new_tokens: int) -> dict:
    """p50 seconds per request for each (store name, number of variants)."""
    from serve.compare import compare
    from serve.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=True)
    cases = [(name, n) for name in stores for n in VARIANTS if not (name != "app" and n == 1)]
    texts = {}
    for name, n in cases:  # build and warm up every case once
        result = compare(stores[name], PROMPT, VARIANTS[n], settings)
        texts[name, n] = [p.text for p in result.panes]
        assert not any(p.error for p in result.panes), [p.error for p in result.panes]
    for name, n in cases:  # every way of batching must give the same texts
        assert texts[name, n] == texts["app", n], (name, n)
    times: dict = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            compare(stores[case[0]], PROMPT, VARIANTS[case[1]], settings)
            times[case].append(time.perf_counter() - start)
    return {case: statistics.median(t) for case, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/serve-latency", help="where the two short runs are trained")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the app serves requests in parallel, one each)"
    )
    parser.add_argument("--page", default=default_path("serve_latency"), help="results page to write ('' for none)")
    args = parser.parse_args()

    import torch

    from hf_ema.demo.tiny_run import train_tiny_run
    from serve.loading import CheckpointCatalog

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    runs = {}
    for kind in ("full", "lora"):
        results = train_tiny_run(out / kind, max_steps=12, save_steps=4, lora=kind == "lora", progress=False)
        runs[kind] = Path(results["output_dir"])

    page = DocsPage(
        "serve_latency",
        "App request latency: 1, 2 and 4 weight variants decoded together",
        intro=__doc__.split("\n\n", 1)[1].split("Usage:")[0],
    )
    with page.capture():
        print(
            f"Demo model (hidden 128, 4 layers); {args.max_new_tokens} new tokens, greedy; p50 of {args.rounds} rounds."
        )
        print()
        for kind, run in runs.items():
            catalog = CheckpointCatalog(run, device="cpu")
            names = ["app"] if kind == "lora" else ["app", "per-variant", "sequential", "vmap"]
            stores = {name: timed_store(catalog, name) for name in names}
            p50 = measure(stores, args.rounds, args.max_new_tokens)
            base = p50["app", 1]
            label = "LoRA (one base model, mixed-adapter batch)" if kind == "lora" else "full model"
            print(f"### {label}\n")
            print("| batching | 1 variant | 2 variants | 4 variants | 2 / 1 | 4 / 1 |")
            print("|---|---:|---:|---:|---:|---:|")
            for name in names:
                two, four = p50[name, 2], p50[name, 4]
                title = {
                    "app": "the app's ("
                    + ("peft `adapter_names`" if kind == "lora" else "stacked, batched matmul")
                    + ")",
                    "per-variant": "stacked, each variant's own linear layers",
                    "sequential": "one forward pass per variant",
                    "vmap": "`vmap` + `functional_call`, no KV cache",
                }[name]
                print(
                    f"| {title} | {base * 1000:.0f} ms | {two * 1000:.0f} ms | {four * 1000:.0f} ms "
                    f"| {two / base:.2f}x | {four / base:.2f}x |"
                )
            print()
        print("Targets: 2 variants at most 1.3x one variant, 4 at most 2x (the app's row).")
    page.write(args.page)


if __name__ == "__main__":
    main()

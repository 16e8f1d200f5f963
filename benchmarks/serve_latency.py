"""Latency of one app request for 1, 2 and 4 weight variants (full model and LoRA), and the batching alternatives.

One request is what the app's Generate button runs (`serve.compare.compare`): greedy decoding of every pane from
the same prompt (64 new tokens), then the score matrix (every text under every model) and the token views. The
variants are the panes the issue asks for: 1 = raw; 2 = raw + EMA; 4 = raw + EMA + post-hoc EMA sigma_rel=0.15 +
mean of the last 3 checkpoints, on the run `hf-ema demo` trains (`hf_ema.demo.train_tiny_run` with its defaults:
600 steps, post-hoc snapshots on), full and LoRA, trained first. On runs this long the panes' texts differ,
mostly from the first tokens on, so the score matrix is real work (panes whose texts agree are scored once).
Every variant is built (reconstructed, merged, loaded, stacked) before timing; each round takes the next of four
prompts and runs every case once (1, 2 and 4 variants, every way of batching, at every thread count in turn), and
the figures are the p50 of the rounds, so a slow spell of the machine hits every case and thread count alike.

Threads: "default" is what the app runs with (torch's default, one per core; a request on an idle server uses them
all); "1" pins torch to one thread, the cost per core.

For full models the app runs the variants as one stacked model (`serve.batching.stack_models`, linear layers as
one batched matmul, q/k/v and gate/up fused, `weight @ x` at decoding steps), and takes the score matrix's diagonal
from the decoding logits; the alternatives measured in the same run, through the same request path, are: the stacked
model with each variant's own linear layer on its rows (`linear="per-variant"`, no weight copy), one forward pass
per variant (`SequentialVariants`), and `torch.func.stack_module_state` + `functional_call` under `vmap` (which
cannot grow a KV cache under `vmap`, so it recomputes the whole prefix at each token).

For LoRA runs the app runs a structural copy of the base model that shares its weights
(`serve.batching.stack_adapters`): each LoRA layer's base weights once for the whole batch, then every adapter's
low-rank update on its own rows by two batched matmuls. The alternatives are peft's mixed-adapter batch
(`adapter_names=`, which indexes out each adapter's rows and registers forward hooks on every layer for each call)
and one pass per adapter with the adapter active, which for one variant is peft's own forward: the reference a
one-variant request is compared with.

Reading the figures: LoRA variants share the base model, so a batch of them reads the base weights once per token
and the extra variants cost little. Full-model variants each bring their own weights: at the demo model's size one
variant's decoding step is bound by Python and kernel-launch overhead, which the batch shares, while each extra
variant adds its weights to read at every token; and the score matrix grows as the square of the number of panes
(4 texts under 4 models: up to 12 scored sequences besides the diagonal the decoding already gave). That scoring
pass is compute-bound, so it is the part a second core speeds up.

Usage:
    python benchmarks/serve_latency.py [--output-dir runs/serve-latency] [--rounds 24] [--max-new-tokens 64]
        [--threads default,1] [--alternatives-threads default]
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

PROMPTS = ["The for statement", "A class definition", "Exceptions are", "When a function"]
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
    """A VariantStore whose batches are built the way `how` says: `app`; for full models `per-variant`,
    `sequential`, `vmap`; for LoRA runs `peft-mixed` (peft's `adapter_names=` batches) or `peft-sequential` (one
    pass per adapter, the adapter active: peft's own forward)."""
    from serve.batching import AdapterVariants, SequentialAdapters, SequentialVariants, make_variant_batch
    from serve.loading import RAW
    from serve.variants import VariantStore

    full = {  # from the variants' models
        "per-variant": lambda models: make_variant_batch(models, linear="per-variant"),
        "sequential": SequentialVariants,
        "vmap": lambda models: vmap_batch_class()(models),
    }
    peft = {"peft-mixed": AdapterVariants, "peft-sequential": SequentialAdapters}  # from the adapters' names

    class Store(VariantStore):
        def __init__(self, catalog) -> None:
            super().__init__(catalog)
            self.built: dict = {}

        def batch(self, checkpoint, variants):
            pair = catalog.get(checkpoint)
            if how == "app" or (len(variants) == 1 and not pair.is_peft):
                return super().batch(checkpoint, variants)
            key = (how, tuple(v.adapter if pair.is_peft else id(v.model) for v in variants))
            if key not in self.built:
                if pair.is_peft:
                    names = [v.adapter for v in variants]
                    self.built[key] = peft[how](pair.models[RAW], names, lock=pair.lock)
                else:
                    self.built[key] = full[how]([v.model for v in variants])
            return self.built[key]

    return Store(catalog)


#: Ways of batching measured for one variant as well (the others run one variant as the app does).
ONE_VARIANT = ("app", "peft-sequential")


def measure(configs: dict, rounds: int, max_new_tokens: int) -> dict:
    """p50 seconds per request for each thread count, store name and number of variants.

    `configs` maps `(label, threads)` to `{store name: store}`. Each round runs every case once, on the next prompt,
    every thread count in turn (torch's thread count is switched between cases), so a slow spell of the machine hits
    every case and every thread count alike: comparing cases measured in separate blocks of time would mostly
    compare the machine's speed at those times.
    """
    import torch

    from serve.compare import compare
    from serve.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens, greedy=True)
    cases = {
        config: [(name, n) for name in stores for n in VARIANTS if n > 1 or name in ONE_VARIANT]
        for config, stores in configs.items()
    }
    for config, stores in configs.items():  # build and warm up every case once per prompt
        torch.set_num_threads(config[1])
        for prompt in PROMPTS:
            texts = {}
            for name, n in cases[config]:
                result = compare(stores[name], prompt, VARIANTS[n], settings)
                texts[name, n] = [p.text for p in result.panes]
                assert not any(p.error for p in result.panes), [p.error for p in result.panes]
            for name, n in cases[config]:  # every way of batching must give the same texts
                assert texts[name, n] == texts["app", n], (name, n)
    times: dict = {(config, case): [] for config in configs for case in cases[config]}
    for r in range(rounds):
        for config, stores in configs.items():
            torch.set_num_threads(config[1])
            for case in cases[config]:
                start = time.perf_counter()
                compare(stores[case[0]], PROMPTS[r % len(PROMPTS)], VARIANTS[case[1]], settings)
                times[config, case].append(time.perf_counter() - start)
    p50: dict = {config: {} for config in configs}
    for (config, case), t in times.items():
        p50[config][case] = statistics.median(t)
    return p50


def thread_counts(text: str, default: int) -> list[tuple[str, int]]:
    """`"default,1"` -> [("default", default), ("1", 1)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append((f"default ({default})", default) if item == "default" else (item, int(item)))
    return out


#: The alternatives' rows, and which runs they are measured on.
TITLES = {
    "per-variant": "stacked, each variant's own linear layers",
    "sequential": "one forward pass per variant",
    "vmap": "`vmap` + `functional_call`, no KV cache",
    "peft-mixed": "peft's mixed-adapter batch (`adapter_names`)",
    "peft-sequential": "one pass per adapter (peft's forward, the adapter active)",
}
ALTERNATIVES = {"full": ["per-variant", "sequential", "vmap"], "lora": ["peft-mixed", "peft-sequential"]}


def report_kind(kind: str, catalog, app_threads: list, alt_threads: list, args: argparse.Namespace) -> None:
    """Measure one run (`"full"` or `"lora"`) and print its table and summary lines."""
    label = "LoRA (one base model)" if kind == "lora" else "full model"
    app_title = "the app's (" + ("stacked LoRA updates" if kind == "lora" else "stacked, batched matmul") + ")"
    print(f"### {label}\n")
    print("| batching | threads | 1 variant | 2 variants | 4 variants | 2 / 1 | 4 / 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    best: dict[int, float] = {}  # the app's fastest time per number of variants, over the thread counts
    configs = {}
    for config in dict.fromkeys(app_threads + alt_threads):
        names = ["app"] + (ALTERNATIVES[kind] if config in alt_threads else [])
        configs[config] = {name: timed_store(catalog, name) for name in names}
    p50s = measure(configs, args.rounds, args.max_new_tokens)
    for config, p50 in p50s.items():
        base = p50["app", 1]
        if config in app_threads:
            for n in VARIANTS:
                best[n] = min(best.get(n, float("inf")), p50["app", n])
        for name in configs[config]:
            if name == "app" and config not in app_threads:
                continue
            two, four = p50[name, 2], p50[name, 4]
            print(
                f"| {app_title if name == 'app' else TITLES[name]} | {config[0]} | {base * 1000:.0f} ms "
                f"| {two * 1000:.0f} ms | {four * 1000:.0f} ms | {two / base:.2f}x | {four / base:.2f}x |"
            )
    print()
    for config, p50 in p50s.items():
        if ("peft-sequential", 1) in p50:
            print(
                f"One variant through peft's own forward (the adapter active), {config[0]} threads: "
                f"{p50['peft-sequential', 1] * 1000:.0f} ms; the app's: {p50['app', 1] * 1000:.0f} ms.\n"
            )
    if len(app_threads) > 1:
        # A second thread does little for the one-variant request (its decoding steps are small) and speeds up the
        # batched ones: compare each with the fastest one-variant time.
        print(
            f"The app's fastest request at any of these thread counts: 1 variant {best[1] * 1000:.0f} ms, "
            f"2 variants {best[2] * 1000:.0f} ms ({best[2] / best[1]:.2f}x), 4 variants "
            f"{best[4] * 1000:.0f} ms ({best[4] / best[1]:.2f}x).\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/serve-latency", help="where the two demo runs are trained")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads", default="default,1", help="torch thread counts for the app's rows ('default' = one per core)"
    )
    parser.add_argument("--alternatives-threads", default="default", help="thread counts for the alternatives' rows")
    parser.add_argument("--page", default=default_path("serve_latency"), help="results page to write ('' for none)")
    args = parser.parse_args()

    import torch

    from hf_ema.demo.tiny_run import train_tiny_run
    from serve.loading import CheckpointCatalog

    default_threads = torch.get_num_threads()
    app_threads = thread_counts(args.threads, default_threads)
    alt_threads = thread_counts(args.alternatives_threads, default_threads)
    out = Path(args.output_dir)
    runs = {}
    for kind in ("full", "lora"):
        # The demo run exactly (its defaults), trained afresh: a finished run in the folder would be reused as is.
        results = train_tiny_run(out / kind, lora=kind == "lora", progress=False, force=True)
        runs[kind] = Path(results["output_dir"])

    page = DocsPage(
        "serve_latency",
        "App request latency: 1, 2 and 4 weight variants decoded together",
        intro=__doc__.split("\n\n", 1)[1].split("Usage:")[0],
    )
    with page.capture():
        print(
            f"Demo model (hidden 128, 4 layers), the demo run's final checkpoint; {args.max_new_tokens} new tokens, "
            f"greedy; p50 of {args.rounds} rounds over {len(PROMPTS)} prompts."
        )
        print()
        for kind, run in runs.items():
            report_kind(kind, CheckpointCatalog(run, device="cpu"), app_threads, alt_threads, args)
        print("Targets: 2 variants at most 1.3x one variant, 4 at most 2x (the app's rows).")
    torch.set_num_threads(default_threads)
    page.write(args.page)


if __name__ == "__main__":
    main()

"""The EMA on a GPU: the update's share of memory bandwidth, its host synchronisations, and Trainer throughput.

Written for one CUDA GPU (an H200 or H100), and runnable unchanged there:

    python benchmarks/gpu.py                          # every section, writes docs/benchmarks/gpu.md
    python benchmarks/gpu.py --section update,syncs   # some sections (update, syncs, blocks, trainer)
    python benchmarks/gpu.py --allow-cpu --tiny       # the script's logic on a machine without a GPU (no page)

Sections, each measured side by side in one process:

- update: one update of a 1B Llama's weights (fp32, and bf16 with an fp32 EMA): hf-ema's default (the Triton
  kernel with the non-finite check fused in), without the check, with the eager kernels (`HF_EMA_KERNEL=eager`), and
  torch `AveragedModel`, ema-pytorch, diffusers `EMAModel` and timm `ModelEmaV3`. Each round times every
  implementation in turn (CUDA events around each call, median of `--reps`); the first round is dropped; the table
  gives the median over the rounds and their spread. The bytes an update must move (read the weights, read and
  write the EMA), over its time, divided by the device-to-device copy bandwidth measured in the same run, is the
  fraction of the bandwidth it reaches.
- syncs: host synchronisations per `ModelEMA.update()` in each `on_nonfinite` mode, on the current stream, on a side
  stream and before `start_step` (copies), counted by `torch.cuda.set_sync_debug_mode("warn")`.
- blocks: the Triton kernel's block size and warps (`HF_EMA_TRITON_BLOCK`, `HF_EMA_TRITON_WARPS`), for tuning.
- trainer: a `Trainer` on 200M and 1B Llamas (bf16 autocast, batch 8 x 256, random tokens): no EMA, the default
  EMA, a side stream (`cuda_stream=True`), offloaded to the CPU (`device="cpu"`), offloaded with `update_every=4`.
  Each round trains every configuration in turn; the first round is dropped. Per configuration: steps/s over the
  steps after the in-run warm-up (host clock between two `torch.cuda.synchronize()`), the EMA's own GPU time per
  step (CUDA events around the callback's update on the current stream), and for offloading the mean interval its
  updates took (coalesced while the host fold was busy).

On the lent GPU, which has no network: carry the anchors' wheels (`pip download --no-deps` of `ema-pytorch`,
`diffusers` and `importlib_metadata` 8.x, see the device tool's README) and put the project on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anchors as A  # noqa: E402
from _docs_page import DocsPage, default_path  # noqa: E402

SECTIONS = ("update", "syncs", "blocks", "trainer")


# ---------------------------------------------------------------------------------------------------- timing
class Clock:
    """Times one call: CUDA events on the current stream on a GPU, the host clock on the CPU (smoke test)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start) -> Callable[[], float]:
        """Returns a function giving the elapsed milliseconds (read after a synchronise)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)
        elapsed = (time.perf_counter() - start) * 1e3
        return lambda: elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    clock = Clock(device)
    readers = []
    for _ in range(reps):
        start = clock.start()
        fn()
        readers.append(clock.stop(start))
    sync(device)
    return statistics.median(r() for r in readers)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def copy_bandwidth(device: torch.device, numel: int, reps: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * numel * 4 / (ms / 1e3)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test only)"


@contextlib.contextmanager
def kernel_env(**env: str):
    """Set environment variables for the EMAs built inside (the kernel choice is read when an EMA is built)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------- update
def hf_ema_impl(model, label: str, env: dict[str, str] | None = None, **kwargs) -> A.Impl:
    with kernel_env(**(env or {})):
        impl = A.hf_ema(model, **kwargs)
    impl.name = label
    return impl


def update_impls(model) -> dict[str, Callable[[], A.Impl | None]]:
    return {
        "hf-ema (default)": lambda: hf_ema_impl(model, "hf-ema default"),
        "hf-ema, on_nonfinite='ignore'": lambda: hf_ema_impl(model, "hf-ema ignore", on_nonfinite="ignore"),
        "hf-ema, eager kernels": lambda: hf_ema_impl(model, "hf-ema eager", env={"HF_EMA_KERNEL": "eager"}),
        "torch AveragedModel": lambda: A.torch_averaged_model(model),
        "ema-pytorch (foreach)": lambda: A.ema_pytorch(model, True),
        "diffusers EMAModel (foreach)": lambda: A.diffusers_ema(model, True),
        "timm ModelEmaV3": lambda: A.timm_ema(model),
    }


def update_section(args, device) -> None:
    size = "50M" if args.tiny else "1B"
    bw = copy_bandwidth(device, (4 << 20) if args.tiny else (512 << 20), args.reps)
    print(f"\n### One EMA update, {size} Llama, on {device_name(device)}\n")
    print(f"Device-to-device copy bandwidth in this run: {bw / 1e9:.0f} GB/s.\n")
    print("| weights | implementation | kernel | EMA dtype | ms / update (spread) | share of copy bandwidth |")
    print("|---|---|---|---|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        model = A.build_llama(size, dtype, device=device)
        n = sum(p.numel() for p in model.parameters())
        impls = {}
        for label, build in update_impls(model).items():
            try:
                impls[label] = build()
            except ImportError:
                impls[label] = None
        times: dict[str, list[float]] = {k: [] for k, v in impls.items() if v is not None}
        for rnd in range(args.rounds + 1):
            for label in times:
                impl = impls[label]
                assert impl is not None
                ms = median_ms(impl.update, device, args.reps)
                if rnd:  # round 0 warms up (Triton compiles, caches fill)
                    times[label].append(ms)
        for label, impl in impls.items():
            if impl is None:
                print(f"| {str(dtype)[6:]} | {label} | | - | not installed | |")
                continue
            ms = statistics.median(times[label])
            moved = n * (dtype.itemsize + 2 * impl.ema_dtype.itemsize)
            kernel = impl.note.removeprefix("kernel: ") if impl.note.startswith("kernel: ") else "foreach"
            print(
                f"| {str(dtype)[6:]} | {label} | {kernel} | {str(impl.ema_dtype)[6:]} | {ms:.2f} "
                f"({spread(times[label])}) | {moved / (ms / 1e3) / bw:.2f} |"
            )
        for impl in impls.values():
            if impl is not None and hasattr(impl.holder, "close"):
                impl.holder.close()
        del impls, model
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- syncs
def count_syncs(ema, model, steps: int) -> float:
    """Host synchronisations per `update()`, seen by torch's sync debug mode (CUDA only)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    ema.update()  # outside: the first call may compile
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3)
                ema.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in seen) / steps


def syncs_section(args, device) -> None:
    print("\n### Host synchronisations per `ModelEMA.update()` (`torch.cuda.set_sync_debug_mode`)\n")
    if device.type != "cuda":
        print("No CUDA device: nothing to count.")
        return
    model = A.build_llama("50M", torch.bfloat16, device=device)
    setups = {
        "current stream": {},
        "side stream (cuda_stream=True)": {"cuda_stream": True},
        "before start_step (copies)": {"start_step": 10_000},
        "update_every=4": {"update_every": 4},
    }
    print("| setup | skip (default) | raise | ignore | skip, eager kernels |")
    print("|---|---:|---:|---:|---:|")
    for label, kwargs in setups.items():
        row = []
        for mode, env in (("skip", {}), ("raise", {}), ("ignore", {}), ("skip", {"HF_EMA_KERNEL": "eager"})):
            from hf_ema import ModelEMA

            with kernel_env(**env):
                ema = ModelEMA(model, decay=0.999, on_nonfinite=mode, **kwargs)
            row.append(f"{count_syncs(ema, model, args.reps):.2f}")
            ema.close()
        print(f"| {label} | " + " | ".join(row) + " |")


# ---------------------------------------------------------------------------------------------------- blocks
def blocks_section(args, device) -> None:
    size = "50M" if args.tiny else "1B"
    print(f"\n### Triton kernel configurations, {size} Llama (share of copy bandwidth, NaN check on)\n")
    bw = copy_bandwidth(device, (4 << 20) if args.tiny else (512 << 20), args.reps)
    configs = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)]
    print("| weights | " + " | ".join(f"{b} / {w} warps" for b, w in configs) + " |")
    print("|---|" + "---:|" * len(configs))
    for dtype in (torch.float32, torch.bfloat16):
        model = A.build_llama(size, dtype, device=device)
        n = sum(p.numel() for p in model.parameters())
        cells = []
        for block, warps in configs:
            impl = hf_ema_impl(
                model, "hf-ema", env={"HF_EMA_TRITON_BLOCK": str(block), "HF_EMA_TRITON_WARPS": str(warps)}
            )
            median_ms(impl.update, device, 3)
            ms = median_ms(impl.update, device, args.reps)
            cells.append(f"{n * (dtype.itemsize + 8) / (ms / 1e3) / bw:.2f}")
            impl.holder.close()
            del impl
        print(f"| {str(dtype)[6:]} | " + " | ".join(cells) + " |")
        del model


# ---------------------------------------------------------------------------------------------------- trainer
class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.data = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def timed_callback_class():
    from hf_ema import EMACallback

    class TimedEMACallback(EMACallback):
        """The EMA callback with CUDA events around its update (the EMA's own GPU time on the current stream)."""

        def __init__(self, clock: Clock, **kwargs) -> None:
            super().__init__(**kwargs)
            self.clock, self.readers = clock, []

        def on_step_end(self, args, state, control, **kwargs):
            start = self.clock.start()
            super().on_step_end(args, state, control, **kwargs)
            self.readers.append(self.clock.stop(start))

    return TimedEMACallback


def step_clock_class():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Host time between two synchronised steps: the warm-up's last and the run's last."""

        def __init__(self, device, warm: int, steps: int) -> None:
            self.device, self.warm, self.steps = device, warm, steps
            self.t0 = self.t1 = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (self.warm, self.steps):
                sync(self.device)
                now = time.perf_counter()
                self.t0, self.t1 = (now, self.t1) if state.global_step == self.warm else (self.t0, now)

    return StepClock


TRAINER_CONFIGS: dict[str, dict | None] = {
    "no EMA": None,
    "default": {},
    "side stream (cuda_stream=True)": {"cuda_stream": True},
    'offloaded (device="cpu")': {"device": "cpu"},
    "offloaded, update_every=4": {"device": "cpu", "update_every": 4},
}


def train_once(model, data, device, ema_kwargs, steps: int, warm: int, tmp: str):
    from transformers import Trainer, TrainingArguments

    clock = Clock(device)
    cb = None if ema_kwargs is None else timed_callback_class()(clock, decay=0.999, save_final=False, **ema_kwargs)
    timer = step_clock_class()(device, warm, steps)
    targs = TrainingArguments(
        output_dir=tmp,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        disable_tqdm=True,
        logging_steps=10**6,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[c for c in (cb, timer) if c is not None])
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its final metrics: keep them off the page
        trainer.train()
    rate = (steps - warm) / (timer.t1 - timer.t0)
    ema_ms = statistics.median(r() for r in cb.readers[warm:]) if cb is not None else 0.0
    interval = None
    if cb is not None:
        intervals = cb.ema.update_intervals
        interval = sum(k * v for k, v in intervals.items()) / max(1, sum(intervals.values()))
        cb.ema.close()
    return rate, ema_ms, interval


def trainer_section(args, device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)}
    if not args.tiny:
        sizes = {"200M": A.LLAMA_SIZES["200M"], "1B": A.LLAMA_SIZES["1B"]}
    steps, warm = (6, 2) if args.tiny else (args.steps + args.warm, args.warm)
    for size, shape in sizes.items():
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True, **shape)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device)
        n = sum(p.numel() for p in model.parameters())
        data = RandomTokens(8 * steps, 64 if args.tiny else 256, 32000)
        results: dict[str, list[tuple]] = {k: [] for k in TRAINER_CONFIGS}
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds + 1):
                for label, kwargs in TRAINER_CONFIGS.items():
                    out = train_once(model, data, device, kwargs, steps, warm, tmp)
                    if rnd:  # round 0 warms up (Triton and the allocator; the first Trainer run is slower)
                        results[label].append(out)
                    print(f"<!-- {size} round {rnd} {label}: {out[0]:.2f} steps/s -->", file=sys.stderr, flush=True)
        print_trainer_table(size, n, device, steps - warm, results)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_trainer_table(size: str, n: int, device, measured: int, results: dict[str, list[tuple]]) -> None:
    base = statistics.median(r[0] for r in results["no EMA"])
    base_step_ms = 1e3 / base
    print(
        f"\n### Trainer, {size} Llama ({n / 1e6:.0f}M parameters), {device_name(device)}, bf16 autocast, "
        f"batch 8 x 256, {measured} steps a run\n"
    )
    print(
        "| configuration | steps/s (spread) | vs no EMA | EMA GPU ms / step | step overhead / EMA GPU time | "
        "mean update interval |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, runs in results.items():
        rates = [r[0] for r in runs]
        rate = statistics.median(rates)
        ema_ms = statistics.median(r[1] for r in runs)
        overhead = 1e3 / rate - base_step_ms
        ratio = f"{overhead / ema_ms:.2f}" if ema_ms > 0.05 and label != "no EMA" else "-"
        intervals = [r[2] for r in runs if r[2] is not None]
        interval = f"{statistics.median(intervals):.1f}" if intervals else "-"
        print(f"| {label} | {rate:.2f} ({spread(rates)}) | {rate / base:.3f} | {ema_ms:.2f} | {ratio} | {interval} |")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", default="all", help=f"'all' or a comma-separated subset of {SECTIONS}")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per implementation and round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one dropped warm-up round)")
    parser.add_argument("--steps", type=int, default=40, help="measured Trainer steps per run")
    parser.add_argument("--warm", type=int, default=10, help="Trainer steps per run before the measured ones")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is there (logic check)")
    parser.add_argument("--tiny", action="store_true", help="small sizes (with --allow-cpu)")
    parser.add_argument(
        "--page", default=None, help="results page to write (default: docs/benchmarks/gpu.md on a GPU, none on CPU)"
    )
    args = parser.parse_args(argv)
    sections = SECTIONS if args.section == "all" else tuple(s.strip() for s in args.section.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--section: unknown {unknown}; choose from {SECTIONS}")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("no CUDA device: nothing to measure (use --allow-cpu --tiny to check the script on CPU)")
        return
    print(f"torch {torch.__version__} on {device_name(device)}", file=sys.stderr)
    page = DocsPage("gpu", "EMA on a GPU", intro=__doc__.split("\n\n", 2)[2].split("\n\nOn the lent GPU")[0])
    runners = {"update": update_section, "syncs": syncs_section, "blocks": blocks_section, "trainer": trainer_section}
    with page.capture():
        for name in sections:
            try:
                runners[name](args, device)
            except Exception:  # one section failing must not lose the others' figures
                print(f"\nSection `{name}` failed:\n\n```\n{traceback.format_exc()}```")
    page.write(args.page if args.page is not None else (default_path("gpu") if device.type == "cuda" else None), argv)


if __name__ == "__main__":
    main()

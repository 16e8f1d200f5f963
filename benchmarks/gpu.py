"""GPU section: EMA update bandwidth as a fraction of HBM bandwidth (1B-parameter Llama), and Trainer step overhead
with the side stream and with CPU offload. Written for one CUDA GPU (e.g. the lent H100); runs unchanged there:

    python benchmarks/gpu.py                      # both sections
    python benchmarks/gpu.py --section update     # only the update bandwidth
    python benchmarks/gpu.py --allow-cpu --tiny   # smoke test of the script's logic on a machine without a GPU

Update: for fp32 and bf16 weights, one `ModelEMA.update()` (fp32 EMA) and the anchors, median of `--reps` calls
after warm-up, each bracketed by `torch.cuda.synchronize()`. The bytes it must move (read the weights, read and
write the fp32 EMA) over its time, divided by the device-to-device copy bandwidth measured in the same run, is the
fraction of HBM bandwidth it reaches.

Trainer: steps/s of a Llama on the GPU with no EMA, hf-ema on the current stream, hf-ema on a side stream
(`cuda_stream=True`), hf-ema offloaded to pinned host memory with the async update (with and without the side
stream), as ratios to no EMA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anchors as A  # noqa: E402
from _docs_page import DocsPage, default_path  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def copy_bandwidth(device, numel: int, reps: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, reps)
    return 2 * numel * 4 / t


def update_section(args, device) -> None:
    size = "50M" if args.tiny else "1B"
    bw = copy_bandwidth(device, (16 << 20) if args.tiny else (512 << 20), args.reps)
    print(f"\n### EMA update on {device_name(device)}, {size} Llama; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| weights | implementation | EMA dtype | ms / update | GB/s moved | fraction of copy bandwidth |")
    print("|---|---|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        model = A.build_llama(size, dtype, device=device)
        n = sum(p.numel() for p in model.parameters())
        impls = [("hf_ema", A.hf_ema), ("hf_ema_stream", lambda m: A.hf_ema(m, cuda_stream=True))]
        impls += [(k, A.ANCHORS[k]) for k in ("averaged_model", "diffusers_foreach", "ema_pytorch_foreach", "timm_v3")]
        for key, builder in impls:
            impl = A.safe_build(builder, model)
            if impl is None:
                print(f"| {str(dtype)[6:]} | {key} | - | not installed | | |")
                continue
            ema = impl.holder

            def step(impl=impl, ema=ema):
                impl.update()
                if hasattr(ema, "wait"):
                    ema.wait()  # a side-stream update is timed to its completion

            t = time_call(step, device, args.reps)
            ema_bytes = impl.ema_dtype.itemsize
            moved = n * (dtype.itemsize + 2 * ema_bytes)
            print(
                f"| {str(dtype)[6:]} | {impl.name} | {str(impl.ema_dtype)[6:]} | {t * 1e3:.2f} | "
                f"{moved / t / 1e9:.0f} | {moved / t / bw:.2f} |"
            )
            if hasattr(ema, "close"):
                ema.close()
            del impl, ema
            torch.cuda.empty_cache() if device.type == "cuda" else None
        del model


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test only)"


def trainer_section(args, device) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_ema import EMACallback
    from hf_ema.demo.toy import lm_datasets, tiny_causal_lm, train_tokenizer

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter())

    hidden, layers = (64, 2) if args.tiny else (1024, 12)
    steps, warm = (6, 2) if args.tiny else (args.steps, 5)
    tok = train_tokenizer(vocab_size=512 if args.tiny else 8192)
    train_ds, _ = lm_datasets(tok, block_size=64 if args.tiny else 256, max_train_blocks=4 * steps * 8)
    configs = {
        "no EMA": lambda: None,
        "hf-ema, current stream": lambda: EMACallback(decay=0.999, save_final=False),
        "hf-ema, side stream (cuda_stream=True)": lambda: EMACallback(decay=0.999, cuda_stream=True, save_final=False),
        "hf-ema, offloaded + async": lambda: EMACallback(decay=0.999, device="cpu", save_final=False),
        "hf-ema, offloaded + async + side stream": lambda: EMACallback(
            decay=0.999, device="cpu", cuda_stream=True, save_final=False
        ),
    }
    speeds = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, make in configs.items():
                model = tiny_causal_lm(tok, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64))
                cb, clock = make(), Clock()
                targs = TrainingArguments(
                    output_dir=tmp,
                    max_steps=steps,
                    per_device_train_batch_size=8,
                    learning_rate=1e-3,
                    save_strategy="no",
                    report_to=[],
                    use_cpu=device.type != "cuda",
                    bf16=device.type == "cuda",
                    disable_tqdm=True,
                    logging_steps=10_000,
                )
                Trainer(
                    model=model, args=targs, train_dataset=train_ds, callbacks=[c for c in (cb, clock) if c]
                ).train()
                if cb is not None:
                    cb.ema.close()
                t = clock.times
                speeds[name].append((len(t) - 1 - warm) / (t[-1] - t[warm]))
    base = statistics.median(speeds["no EMA"])
    print(f"\n### Trainer on {device_name(device)}: Llama hidden {hidden}, {layers} layers, bf16 autocast, fp32 EMA\n")
    print("| configuration | steps/s | vs no EMA |")
    print("|---|---:|---:|")
    for name, values in speeds.items():
        s = statistics.median(values)
        print(f"| {name} | {s:.2f} | {s / base:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", "update", "trainer"], default="all")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU is there (logic check)")
    parser.add_argument("--tiny", action="store_true", help="small sizes (with --allow-cpu)")
    parser.add_argument(
        "--page", default=None, help="results page to write (default: docs/benchmarks/gpu.md on a GPU, none on CPU)"
    )
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("no CUDA device: nothing to measure (use --allow-cpu --tiny to check the script on CPU)")
        return
    print(f"torch {torch.__version__} on {device_name(device)}")
    page = DocsPage(
        "gpu",
        "EMA on a GPU",
        intro=(
            "Update: for fp32 and bf16 weights, one `ModelEMA.update()` (fp32 EMA) and the other libraries' updates, "
            "median of the calls after warm-up, each bracketed by `torch.cuda.synchronize()`; the bytes an update "
            "must move over its time, divided by the device-to-device copy bandwidth measured in the same run. "
            "Trainer: steps/s of a Llama with no EMA, hf-ema on the current stream, on a side stream "
            "(`cuda_stream=True`), and offloaded to pinned host memory with the async update, as ratios to no EMA."
        ),
    )
    with page.capture():
        if args.section in ("all", "update"):
            update_section(args, device)
        if args.section in ("all", "trainer"):
            trainer_section(args, device)
    page.write(args.page if args.page is not None else (default_path("gpu") if device.type == "cuda" else None), argv)


if __name__ == "__main__":
    main()

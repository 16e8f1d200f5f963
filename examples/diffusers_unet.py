"""A diffusers `UNet2DModel` trained as a denoiser in an `accelerate` loop, with an EMA of its weights.

    pip install ".[diffusers]"      # in a clone of hf-ema
    python examples/diffusers_unet.py                                   # offline: tiny UNet, synthetic images
    accelerate launch examples/diffusers_unet.py --max-steps 2000       # several processes: the EMA is sharded

`ModelEMA` averages the UNet after each optimizer step. The EMA is saved inside each `accelerator.save_state`
checkpoint (`checkpoint-N/ema/`) by a save-state hook, and restored by a load-state hook when a run resumes with
`--resume-from checkpoint-N`, so the checkpoint stays safetensors and JSON (`accelerator.register_for_checkpointing`
would pickle the EMA state). At the end `OUTPUT_DIR/ema/` holds the EMA as diffusers writes a model: it loads with
`UNet2DModel.from_pretrained(OUTPUT_DIR + "/ema")`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler

from hf_ema import ModelEMA, load_ema, save_ema
from hf_ema.demo.toy import tiny_unet


def synthetic_images(count: int = 256, size: int = 16) -> torch.Tensor:
    """Gaussian blobs at random places, in [-1, 1]: `(count, 1, size, size)`."""
    gen = torch.Generator().manual_seed(1234)
    centre = torch.rand(count, 2, generator=gen) * size
    width = 1.5 + 2.5 * torch.rand(count, 1, 1, generator=gen)
    grid = torch.arange(size, dtype=torch.float32)
    dist2 = (grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)) ** 2 + (
        grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)
    ) ** 2
    return (2 * torch.exp(-dist2 / (2 * width**2)) - 1).unsqueeze(1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/diffusers_unet")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    parser.add_argument("--save-every", type=int, default=100, help="Steps between `accelerator.save_state` calls")
    parser.add_argument("--resume-from", default=None, help="A checkpoint-N folder of an earlier run to resume")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)

    accelerator = Accelerator()
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    noise_scheduler = DDPMScheduler(num_train_timesteps=100)
    images = synthetic_images()
    # The EMA of the prepared model: under several processes each rank keeps 1/N of it.
    ema = ModelEMA(model, decay=args.decay)

    # The EMA goes into every accelerate checkpoint, as an `ema/` folder (every process calls the hooks).
    def save_ema_hook(models, weights, folder):
        save_ema(ema, Path(folder) / "ema")

    def load_ema_hook(models, folder):
        load_ema(ema, Path(folder) / "ema")

    accelerator.register_save_state_pre_hook(save_ema_hook)
    accelerator.register_load_state_pre_hook(load_ema_hook)

    start = 0
    if args.resume_from is not None:
        accelerator.load_state(args.resume_from)
        start = ema.step

    per_process = args.batch_size // accelerator.num_processes
    loss = torch.tensor(float("nan"))
    for step in range(start + 1, args.max_steps + 1):
        # The batch, noise and timesteps of a step depend on the step alone, so a resumed run sees the same ones.
        gen = torch.Generator().manual_seed(step)
        index = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
        clean = images[index][mine].to(accelerator.device)
        noise = torch.randn(clean.shape, generator=gen).to(accelerator.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        timesteps = timesteps[mine].to(accelerator.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        if step % args.save_every == 0:
            accelerator.save_state(str(output_dir / f"checkpoint-{step}"))

    save_ema(ema, output_dir / "ema")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"step {args.max_steps}: loss {loss.item():.4f}; EMA in {output_dir / 'ema'}")
    return {"loss": loss.item(), "ema": ema, "ema_dir": output_dir / "ema"}


if __name__ == "__main__":
    main()

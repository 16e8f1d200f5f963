"""What the multi-process workers and the single-process reference share: the model, the data and the loop.

Both sides build the same tiny Llama from a config (odd vocabulary and widths, so shards are uneven), feed the same
global batches in the same order and train with plain SGD (no optimizer state, so a resumed run continues exactly).
With N ranks each rank takes rows `[r * B/N, (r + 1) * B/N)` of the global batch; the loss is a mean over the same
number of tokens on every rank, so averaging the ranks' gradients gives the full-batch gradient.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

VOCAB = 101
GLOBAL_BATCH = 4
SEQ = 16
STEPS = 6
SAVE_STEP = 4
LR = 0.5
DECAY = 0.8
#: The `TrainingArguments` the Trainer workers share (`trainer_ddp_worker.py`, `trainer_engine_worker.py`): 4 optimizer
#: steps of 2 rows per rank (16 training rows over 2 ranks), a checkpoint and an evaluation every 2 steps.
TRAINER_ARGS = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    learning_rate=0.05,
    lr_scheduler_type="constant",
    save_strategy="steps",
    save_steps=2,
    eval_strategy="steps",
    eval_steps=2,
    per_device_eval_batch_size=2,
    logging_steps=1,
    report_to=[],
    seed=0,
    dataloader_num_workers=0,
    disable_tqdm=True,
)


def build_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def batches() -> torch.Tensor:
    """`(STEPS, GLOBAL_BATCH, SEQ)` token ids, fixed by a seed."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=gen)


def rank_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per = GLOBAL_BATCH // world_size
    return batch[rank * per : (rank + 1) * per]


def train_step(model, optimizer, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def eval_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (2, SEQ), generator=gen)


@torch.no_grad()
def eval_loss(model) -> float:
    ids = eval_batch()
    return float(model(input_ids=ids, labels=ids).loss)


def build_lora_model():
    """The same base model (seed 0) with LoRA adapters on q_proj and v_proj; the adapter init is seeded too."""
    from peft import LoraConfig, get_peft_model

    model = build_model(seed=0)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        # PEFT 0.21's `PeftModel.__init__` reads transformers 5's deprecated `is_gradient_checkpointing`: a warning
        # between two upstreams, not about anything hf-ema or this test calls.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def build_unet(seed: int = 0):
    """A tiny diffusers `UNet2DModel` of 8x8 images (its `save_pretrained` ignores a `state_dict` argument)."""
    from hf_ema.demo.toy import tiny_unet

    return tiny_unet(sample_size=8, seed=seed)


def build(mode: str, seed: int = 0):
    """The model of a worker mode: LoRA modes always use the same base and adapter init (their resumed and
    `copy_to` models must share the frozen base weights); a `_bf16` suffix casts the model to bfloat16."""
    model = build_lora_model() if mode.startswith("lora_") else build_model(seed=seed)
    return model.to(torch.bfloat16) if mode.endswith("_bf16") else model


def wrap(model, mode: str):
    """Wrap a Llama for `mode` on CPU ranks: `"fsdp2"` (`fully_shard`), `"fsdp1"` (`use_orig_params=True`), each
    decoder layer its own unit, or `"ddp"`; a `"lora_"` prefix and a `"_bf16"` suffix are ignored. Shared by the workers here and by
    `benchmarks/sharded_memory.py`."""
    import torch.distributed as dist
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    mode = mode.removeprefix("lora_").removesuffix("_bf16")
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(
            model,
            device_id=torch.device("cpu"),
            use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        )
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    raise ValueError(mode)


def saved_ema(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA tensors of an `ema/` folder under their EMA names, read with safetensors from the file and key that
    its `ema_state.json` names for each (the weights file, or `ema_state.safetensors` for a bf16 model)."""
    from safetensors import safe_open

    meta = json.loads((Path(folder) / "ema_state.json").read_text())
    out = {}
    for name, where in meta["tensors"].items():
        with safe_open(str(Path(folder) / where["file"]), framework="pt") as f:
            out[name] = f.get_tensor(where["key"])
    return out

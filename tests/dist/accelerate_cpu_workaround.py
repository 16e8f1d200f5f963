"""How the tests run a real `Trainer` with DeepSpeed ZeRO-3 or FSDP on CPU ranks (gloo). Test-only code.

**The FSDP part relies on accelerate internals** (accelerate 1.15): with `TrainingArguments(use_cpu=True, fsdp=...)`
accelerate sets the shared `PartialState` to `DistributedType.MULTI_CPU` and keeps an FSDP plugin only for GPU-like
distributed types, so it silently drops FSDP and trains plain DDP. `force_fsdp_on_cpu()` overwrites the shared
state's `distributed_type` with `MULTI_GPU` after the `TrainingArguments` exist and before the `Trainer` is built,
which makes accelerate keep the plugin and wrap the model in FSDP on the CPU ranks. FSDP1 also needs
`sync_module_states=False` (its broadcast of module states assumes a GPU), `use_orig_params=True` (hf-ema's
requirement), `ACCELERATE_TORCH_DEVICE=cpu` (else its `device_id`, `cpu:<local rank>`, differs from the parameters' `cpu`) and
`SHARDED_STATE_DICT` (accelerate's FSDP1 full-state-dict checkpoint segfaults inside torch on CPU, with or without
hf-ema). `tests/test_trainer_engines.py::test_fsdp_on_cpu_still_needs_the_workaround` fails once accelerate keeps
FSDP on CPU by itself: then delete `force_fsdp_on_cpu()` and build the Trainer with plain arguments.

The DeepSpeed part uses documented options, plus one accelerate internal so that one launch can run several
Trainers (`zero3_args` clears the previous run's `AcceleratorState`): DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`, set by the
launcher before anything imports DeepSpeed) falls back to gloo when oneCCL is missing and JIT-builds its
shared-memory comm op with gcc (cached in `~/.cache/torch_extensions`); accelerate has no CPU branch for
DeepSpeed and would count one process per rank, so `deepspeed_cpu_state()` builds the shared `PartialState` with
`backend="gloo"` and `ACCELERATE_USE_DEEPSPEED=true`, and `zero3_args()` makes the Trainer use it
(`accelerator_config={"use_configured_state": True}`).
"""

from __future__ import annotations

import os
from typing import Any


def deepspeed_cpu_state():
    """Build accelerate's shared `PartialState` for DeepSpeed on CPU ranks with gloo (2 ranks counted as 2).

    Must run before any `TrainingArguments(deepspeed=...)` exists.
    """
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError("launch DeepSpeed CPU workers with DS_ACCELERATOR=cpu in the environment")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    state = PartialState(backend="gloo")
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(
            f"accelerate counts {state.num_processes} processes, torchrun started {os.environ['WORLD_SIZE']}"
        )
    return state


def zero3_config(offload: bool = False) -> dict[str, Any]:
    """A ZeRO-3 config that partitions every parameter (none kept whole), so each rank's EMA is its 1/N partition.

    Args:
        offload (`bool`, *optional*, defaults to `False`): `offload_param` and `offload_optimizer` to `cpu`.
    """
    zero: dict[str, Any] = {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "zero_optimization": zero,
        # The Trainer's default optimizer is torch's AdamW, which DeepSpeed has not tested with ZeRO.
        "zero_allow_untested_optimizer": True,
        # With `offload_optimizer`, accelerate would swap it for DeepSpeedCPUAdam, whose C++ op gcc JIT-builds for
        # minutes on a fresh 2-core machine; the EMA does not depend on the optimizer, so keep torch's AdamW.
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
    }


def zero3_args(output_dir: str, *, offload: bool = False, **overrides: Any):
    """`TrainingArguments` for ZeRO-3 on the CPU ranks of `deepspeed_cpu_state()`.

    Build the model before calling this: once `TrainingArguments(deepspeed=...)` exists, transformers creates
    models inside `deepspeed.zero.Init`, whose initial weights differ from the same seed outside it.

    Args:
        output_dir (`str`): The run folder.
        offload (`bool`, *optional*, defaults to `False`): See `zero3_config`.
        **overrides: Other `TrainingArguments` fields.
    """
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    # Relies on accelerate internals: with `use_configured_state` nothing resets the previous run's
    # `AcceleratorState`, and a second `Accelerator` may not bring its own DeepSpeed plugin. Clear it (keeping the
    # `PartialState` of `deepspeed_cpu_state()`), as `TrainingArguments` does itself without `use_configured_state`.
    AcceleratorState._reset_state(reset_partial_state=False)
    return TrainingArguments(
        output_dir=output_dir,
        deepspeed=zero3_config(offload),
        accelerator_config={"use_configured_state": True},
        **overrides,
    )


def forget_deepspeed_config() -> None:
    """Stop transformers from building the next model inside `zero.Init` (the previous run's config is global)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("transformers still sees a ZeRO-3 config")


def fsdp_args(output_dir: str, version: int, **overrides: Any):
    """`TrainingArguments` for FSDP `version` (1 or 2) on CPU ranks with gloo: full shard, one unit per decoder layer,
    sharded checkpoints. Call `force_fsdp_on_cpu()` after this and before building the `Trainer`.

    Args:
        output_dir (`str`): The run folder.
        version (`int`): 2 for `fully_shard`, 1 for `FullyShardedDataParallel(use_orig_params=True)`.
        **overrides: Other `TrainingArguments` fields.
    """
    from transformers import TrainingArguments

    config: dict[str, Any] = {
        "version": version,
        "reshard_after_forward": True if version == 2 else "full_shard",
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    if version == 1:
        config.update(sync_module_states=False, use_orig_params=True)
    # Read when `TrainingArguments` builds the shared `PartialState`: FSDP1 checks that its `device_id` (accelerate's
    # device, `cpu:<local rank>` by default) is the device the parameters are on (`cpu`).
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        ddp_backend="gloo",
        fsdp=True,
        fsdp_config=config,
        **overrides,
    )


def force_fsdp_on_cpu() -> None:
    """Relies on accelerate internals: make the shared `PartialState` (built by the last `TrainingArguments`) claim
    `MULTI_GPU`, so the `Accelerator` the `Trainer` builds next keeps its FSDP plugin on CPU ranks."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected accelerate's CPU state MULTI_CPU, got {state.distributed_type}")
    state.distributed_type = DistributedType.MULTI_GPU


def fsdp_without_workaround(output_dir: str, version: int, model, dataset) -> dict[str, Any]:
    """What accelerate does with FSDP arguments on CPU ranks when left alone: builds a `Trainer` (no training) and
    reports whether it kept FSDP, for the guard test.

    Args:
        output_dir (`str`): A run folder (nothing is written).
        version (`int`): The FSDP version.
        model (`nn.Module`): A model.
        dataset: A training dataset.
    """
    from transformers import Trainer

    args = fsdp_args(output_dir, version, max_steps=1, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    state = trainer.accelerator.state
    return {
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "has_fsdp_plugin": getattr(state, "fsdp_plugin", None) is not None,
    }

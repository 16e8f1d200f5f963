"""hf-ema: a correct, fast, sharding-aware exponential moving average of model weights for the Hugging Face Trainer."""

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# Public names -> the submodule defining them. They are imported on first access (PEP 562), so `import hf_ema`
# and the `hf-ema` CLI start fast and only what is used loads transformers / peft / safetensors.
_LAZY = {
    "BEMAConfig": "bema",
    "CheckpointError": "errors",
    "CheckpointWriteError": "errors",
    "ConfigError": "errors",
    "ConfigMismatchError": "errors",
    "ConfigTypeError": "errors",
    "EMACallback": "trainer",
    "EMAConfig": "config",
    "EMAEvaluator": "trainer",
    "EMATensor": "ema_tensor",
    "HfEmaError": "errors",
    "HubError": "errors",
    "ModelEMA": "model_ema",
    "NonFiniteWeightsError": "errors",
    "OscillationTracker": "stability",
    "PostHocConfig": "posthoc",
    "PostHocEMA": "posthoc",
    "RunHistory": "tools",
    "StabilityConfig": "stability",
    "StateError": "errors",
    "TensorKind": "ema_tensor",
    "ema_weights": "tools",
    "load_ema": "ema_folder",
    "load_history": "tools",
    "merge_checkpoints": "tools",
    "plot_run": "tools",
    "push_ema": "tools",
    "read_ema_state": "ema_folder",
    "reconstruct": "posthoc",
    "relative_distance": "stability",
    "save_ema": "ema_folder",
    "write_model_card": "tools",
    "write_plain_ema": "tools",
    "wsm_weights": "tools",
}

if TYPE_CHECKING:  # static type checkers and IDEs see the real imports
    from .bema import BEMAConfig
    from .config import EMAConfig
    from .ema_folder import load_ema, read_ema_state, save_ema
    from .ema_tensor import EMATensor, TensorKind
    from .errors import (
        CheckpointError,
        CheckpointWriteError,
        ConfigError,
        ConfigMismatchError,
        ConfigTypeError,
        HfEmaError,
        HubError,
        NonFiniteWeightsError,
        StateError,
    )
    from .model_ema import ModelEMA
    from .posthoc import PostHocConfig, PostHocEMA, reconstruct
    from .stability import OscillationTracker, StabilityConfig, relative_distance
    from .tools import (
        RunHistory,
        ema_weights,
        load_history,
        merge_checkpoints,
        plot_run,
        push_ema,
        write_model_card,
        write_plain_ema,
        wsm_weights,
    )
    from .trainer import EMACallback, EMAEvaluator

__all__ = [
    "BEMAConfig",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigError",
    "ConfigMismatchError",
    "ConfigTypeError",
    "EMACallback",
    "EMAConfig",
    "EMAEvaluator",
    "EMATensor",
    "HfEmaError",
    "HubError",
    "ModelEMA",
    "NonFiniteWeightsError",
    "OscillationTracker",
    "PostHocConfig",
    "PostHocEMA",
    "RunHistory",
    "StabilityConfig",
    "StateError",
    "TensorKind",
    "__version__",
    "ema_weights",
    "load_ema",
    "load_history",
    "merge_checkpoints",
    "plot_run",
    "push_ema",
    "read_ema_state",
    "reconstruct",
    "relative_distance",
    "save_ema",
    "write_model_card",
    "write_plain_ema",
    "wsm_weights",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_ema' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

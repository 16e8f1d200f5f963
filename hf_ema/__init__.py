"""hf-ema: a correct, fast, sharding-aware exponential moving average of model weights for the Hugging Face Trainer."""

__version__ = "0.1.0"

from .callback import EMACallback
from .config import EMAConfig
from .errors import CheckpointError, ConfigError, ConfigTypeError, HfEmaError, StateError
from .evaluation import EMAEvaluator
from .hub import push_ema
from .merge import ema_weights, merge_checkpoints, wsm_weights
from .model_card import write_model_card
from .model_ema import ModelEMA
from .plotting import load_history, plot_run
from .posthoc import PostHocConfig, PostHocEMA, reconstruct
from .serialization import load_ema, read_ema_state, save_ema
from .stability import OscillationTracker, StabilityConfig, relative_distance

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "EMACallback",
    "EMAConfig",
    "EMAEvaluator",
    "HfEmaError",
    "ModelEMA",
    "OscillationTracker",
    "PostHocConfig",
    "PostHocEMA",
    "StabilityConfig",
    "StateError",
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
    "wsm_weights",
]

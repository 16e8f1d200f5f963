"""hf-ema: a correct, fast, sharding-aware exponential moving average of model weights for the Hugging Face Trainer."""

__version__ = "0.1.0"

from .callback import EMACallback
from .config import EMAConfig
from .errors import CheckpointError, ConfigError, ConfigTypeError, HfEmaError
from .model_ema import ModelEMA
from .serialization import load_ema, read_ema_state, save_ema

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "EMACallback",
    "EMAConfig",
    "HfEmaError",
    "ModelEMA",
    "__version__",
    "load_ema",
    "read_ema_state",
    "save_ema",
]

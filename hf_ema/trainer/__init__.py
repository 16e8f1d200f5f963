"""The `transformers.Trainer` integration: [`EMACallback`], the EMA evaluation beside the raw one, `swap_at_end` and
the glue that makes every Hub push carry the EMA."""

from .callback import EMACallback
from .evaluation import EMAEvaluator
from .swap_at_end import make_ema_final

__all__ = ["EMACallback", "EMAEvaluator", "make_ema_final"]

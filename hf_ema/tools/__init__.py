"""After-training tools: merging checkpoints (mean, EMA, WSM), pushing an `ema/` folder to the Hub with its model
card, and plotting a run's raw vs EMA metrics."""

from .hub import push_ema
from .merge import MERGE_RECIPE_NAME, ema_weights, merge_checkpoints, wsm_weights
from .model_card import write_model_card
from .plain_ema import write_plain_ema
from .plotting import RunHistory, load_history, plot_run

__all__ = [
    "MERGE_RECIPE_NAME",
    "RunHistory",
    "ema_weights",
    "load_history",
    "merge_checkpoints",
    "plot_run",
    "push_ema",
    "write_model_card",
    "write_plain_ema",
    "wsm_weights",
]

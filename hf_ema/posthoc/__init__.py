"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMA profiles, the tracker that keeps and snapshots them
during training, and the least-squares reconstruction of any EMA width after training."""

from .profiles import solve_posthoc_weights
from .reconstruction import RECIPE_NAME, Snapshot, describe_snapshots, list_snapshots, reconstruct
from .tracker import POSTHOC_DIRNAME, PostHocConfig, PostHocEMA, resolve_posthoc

__all__ = [
    "POSTHOC_DIRNAME",
    "RECIPE_NAME",
    "PostHocConfig",
    "PostHocEMA",
    "Snapshot",
    "describe_snapshots",
    "list_snapshots",
    "reconstruct",
    "resolve_posthoc",
    "solve_posthoc_weights",
]

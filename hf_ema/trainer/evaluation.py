"""Evaluate the EMA beside the raw weights every time the `Trainer` evaluates, in the same log entry.

`Trainer.evaluate()` calls `self.evaluation_loop(..., metric_key_prefix="eval")`, adds speed metrics, logs the
metrics once (TensorBoard, W&B, `trainer_state.json`) and returns them to `_determine_best_metric`. Wrapping the
trainer instance's `evaluation_loop` to run a second pass with the EMA swapped in, under the prefix
`eval_ema`, and merging its metrics into the raw pass's output therefore puts `eval_ema_loss` (and every
`compute_metrics` key) next to `eval_loss` everywhere, and makes `metric_for_best_model="eval_ema_loss"` work.

The swap is `ModelEMA.swapped()`: in place, no second model, raw weights restored in a `finally` (also when
`compute_metrics` raises). It lives only inside the wrapped call, so a checkpoint, which the Trainer writes after
`evaluate()` returns, always holds the raw weights.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["EMAEvaluator", "EMA_KEY_SUFFIX", "IS_RAW_KEY", "check_best_metric"]

logger = logging.getLogger(__name__)

#: The EMA pass runs under `f"{metric_key_prefix}_{EMA_KEY_SUFFIX}"`: `eval` -> `eval_ema_loss`.
EMA_KEY_SUFFIX = "ema"
#: Metric (suffix of the EMA prefix) that is 1.0 when the `eval_ema_*` values are the raw weights' own.
IS_RAW_KEY = "is_raw"


def check_best_metric(metric_for_best_model: str | None, eval_ema: bool) -> None:
    """Refuse a best-model metric that only the EMA evaluation logs (`eval_ema_loss`, `eval_<name>_ema_<metric>`)
    when that evaluation is off: the Trainer would otherwise stop at its first evaluation, after training began,
    with a `KeyError`.

    Args:
        metric_for_best_model (`str`, *optional*): `TrainingArguments.metric_for_best_model`; like the Trainer, a
            name without the `eval_` prefix gets it.
        eval_ema (`bool`): Whether the EMA is evaluated beside the raw weights.

    Raises:
        `ConfigError`: when the metric is an EMA metric and `eval_ema` is `False`.
    """
    if eval_ema or not metric_for_best_model:
        return
    key = metric_for_best_model if metric_for_best_model.startswith("eval_") else f"eval_{metric_for_best_model}"
    if EMA_KEY_SUFFIX in key.split("_")[1:]:
        raise ConfigError(
            f"`metric_for_best_model` is {metric_for_best_model!r}, which only the EMA evaluation logs, but the "
            f"callback was built with `eval_ema=False`: pass `EMACallback(eval_ema=True)` or choose a raw metric "
            f"such as 'eval_loss'"
        )


class EMAEvaluator:
    """Wraps a `Trainer`'s `evaluation_loop` so that every evaluation also reports the EMA's metrics.

    For each evaluation pass (`description="Evaluation"`, i.e. `Trainer.evaluate` and the evaluations during
    `train()`, not `Trainer.predict`) with prefix `p` (`eval`, or `eval_<name>` for a dict of eval datasets):

    - when the EMA has started (`ema.step > config.start_step`), the pass is run a second time with the EMA swapped
      in and its metrics are added as `{p}_ema_*` (`{p}_ema_loss`, and every `compute_metrics` key), plus
      `{p}_ema_is_raw = 0.0` and `{p}_ema_runtime` (seconds of the EMA pass, swaps included; the Trainer's own
      `{p}_runtime` then covers both passes);
    - before that (no `ModelEMA` yet, e.g. `eval_on_start`, or `step <= start_step`, where the EMA only copies the
      weights), the raw metrics are repeated as `{p}_ema_*` with `{p}_ema_is_raw = 1.0`, so the keys always exist
      and `metric_for_best_model="eval_ema_loss"` never fails.

    A prefix with an `ema` part (`eval_ema`, `ema_check`: a caller evaluating a swapped-in EMA by hand) is left
    alone, and so is any evaluation while `ema.is_swapped` is true (when `ModelEMA` exposes it).

    Args:
        ema_source (`Callable[[], ModelEMA | None]`): Returns the current `ModelEMA` (or `None` when there is none).
    """

    def __init__(self, ema_source: Callable[[], Any]) -> None:
        self.ema_source = ema_source
        #: Set to False to make the wrapper a pass-through (e.g. once the EMA was copied into the model).
        self.active = True
        #: True only while the EMA is swapped into the model.
        self.swapped_in = False
        self._trainer_ref: weakref.ReferenceType[Any] | None = None
        self._wrapper: Callable[..., Any] | None = None
        self._original: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ installing
    def install(self, trainer) -> EMAEvaluator:
        """Wrap `trainer.evaluation_loop` (an instance attribute; the class is untouched). Idempotent.

        Args:
            trainer (`Trainer`): The trainer.
        """
        if self._wrapper is not None and trainer.__dict__.get("evaluation_loop") is self._wrapper:
            return self
        self._trainer_ref = weakref.ref(trainer)
        self._original = trainer.evaluation_loop
        original = self._original

        def evaluation_loop(
            dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
        ):
            return self._run(original, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

        evaluation_loop.__wrapped__ = original  # type: ignore[attr-defined]
        self._wrapper = evaluation_loop
        trainer.evaluation_loop = evaluation_loop
        return self

    def uninstall(self) -> None:
        """Restore the trainer's own `evaluation_loop` (only if nobody wrapped it after us)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is not None and trainer.__dict__.get("evaluation_loop") is self._wrapper:
            del trainer.evaluation_loop
        self._wrapper = None
        self._original = None

    # ------------------------------------------------------------------ the wrapped call
    def _wants_ema(self, description: str, prefix: str) -> bool:
        # A prefix with an `ema` part (`eval_ema`, `ema_check`) is a caller evaluating a swapped-in EMA by hand:
        # swapping again would put the raw weights back in and report them as the EMA's.
        return self.active and description == "Evaluation" and EMA_KEY_SUFFIX not in prefix.split("_")

    def _run(self, original, dataloader, description, prediction_loss_only, ignore_keys, prefix):
        output = original(
            dataloader,
            description=description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=prefix,
        )
        if not self._wants_ema(description, prefix):
            return output
        ema_prefix = f"{prefix}_{EMA_KEY_SUFFIX}"
        ema = self.ema_source()
        if ema is not None and getattr(ema, "is_swapped", False):
            return output  # the model already holds the EMA (see `_wants_ema`)
        if ema is None or ema.step <= ema.config.start_step:
            # The EMA equals the weights (or does not exist yet): report the raw numbers, marked as such.
            ema_metrics = {_rename(k, prefix, ema_prefix): v for k, v in output.metrics.items()}
            ema_metrics[f"{ema_prefix}_{IS_RAW_KEY}"] = 1.0
        else:
            start = time.perf_counter()
            with ema.swapped():
                self.swapped_in = True
                try:
                    ema_output = original(
                        dataloader,
                        description=description,
                        prediction_loss_only=prediction_loss_only,
                        ignore_keys=ignore_keys,
                        metric_key_prefix=ema_prefix,
                    )
                finally:
                    self.swapped_in = False
            ema_metrics = dict(ema_output.metrics)
            ema_metrics[f"{ema_prefix}_{IS_RAW_KEY}"] = 0.0
            # Swap in, pass, swap out. (The Trainer's `{prefix}_runtime` then covers both passes.)
            ema_metrics[f"{ema_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        # Timing of model preparation belongs to the raw pass only.
        ema_metrics.pop(f"{ema_prefix}_model_preparation_time", None)
        output.metrics.update(ema_metrics)
        return output


def _rename(key: str, prefix: str, new_prefix: str) -> str:
    if key.startswith(f"{prefix}_"):
        return f"{new_prefix}_{key[len(prefix) + 1 :]}"
    return f"{new_prefix}_{key}"

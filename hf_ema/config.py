"""`EMAConfig`: every knob of the EMA, validated when it is built and saved as JSON next to the weights."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .bema import BEMAConfig
from .decay import (
    check_sigma_rel,
    decay_from_half_life,
    gamma_from_sigma_rel,
    power_function_beta,
    warmup_decay,
)
from .errors import ConfigError, ConfigTypeError
from .utils.jsonio import read_json, write_json
from .utils.validation import check_bool, check_int, check_number, check_optional_bool, coerce_config

__all__ = [
    "BEMAConfig",
    "CONFIG_NAME",
    "EMAConfig",
    "FieldChange",
    "MATH_FIELDS",
    "SELECTION_FIELDS",
    "config_changes",
]

CONFIG_NAME = "ema_config.json"

DEFAULT_DECAY = 0.999
#: What an update does with NaN/inf weights (`EMAConfig.on_nonfinite`).
NONFINITE_POLICIES = ("skip", "raise", "ignore")

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ConfigTypeError(f"`{name}` must be a regex string or a list of them, got {value!r}")
    if len(value) == 0:
        raise ConfigError(f"`{name}` must not be an empty list, got {value!r}; pass None to select everything")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"`{name}` holds an invalid regular expression {pattern!r}: {err}") from None
    return list(value)


@dataclass
class EMAConfig:
    """Configuration of an exponential moving average of model weights.

    Set the averaging horizon in exactly one way: `decay`, `half_life` or `sigma_rel`. With none of them the decay
    is 0.999 (a horizon of about 1,000 optimizer steps).

    Args:
        decay (`float`, *optional*):
            The EMA decay `beta` in `ema = beta * ema + (1 - beta) * weights`, in [0, 1). Defaults to 0.999 when no
            other horizon is given.
        half_life (`float`, *optional*):
            Horizon as a half-life in optimizer steps: `beta = 0.5 ** (1 / half_life)`. Must be > 0.
        sigma_rel (`float`, *optional*):
            EDM2 power-function EMA of relative width `sigma_rel` in (0, 0.2887): `beta_t = (1 - 1/t) ** (gamma + 1)`
            where `t` counts steps since the EMA started, so the horizon grows with training.
        bema (`bool`, `dict` or `BEMAConfig`, *optional*):
            A bias-corrected EMA ([`BEMAConfig`]): the EMA follows BEMA's schedule, `theta_0` is snapshotted at the
            burn-in step `bema.tau` (in the weights' own dtype), and wherever the EMA is used (evaluation, saving,
            `swapped()`, `copy_to()`) it is the corrected `ema + alpha_t * (theta - theta_0)`. `True` takes the
            defaults. Not combinable with `decay`, `half_life`, `sigma_rel`, `warmup` or `start_step` (the burn-in
            is `bema.tau`).
        warmup (`bool`, *optional*, defaults to `False`):
            Raise the decay gradually: `beta_t = clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)`, `t`
            counting updates from 0. Not combinable with `sigma_rel`.
        inv_gamma (`float`, *optional*, defaults to 1.0):
            Inverse multiplicative factor of the warmup, > 0.
        power (`float`, *optional*, defaults to 2/3):
            Exponent of the warmup, > 0 (2/3 suits long runs, 3/4 short ones).
        min_decay (`float`, *optional*, defaults to 0.0):
            Floor of the warmup decay, in [0, decay].
        update_every (`int`, *optional*, defaults to 1):
            Update only every `update_every` optimizer steps, using `beta ** update_every` so that the horizon in
            optimizer steps does not change.
        max_update_interval (`int`, *optional*, defaults to 32):
            For an offloaded EMA folded in the background (`device="cpu"`): when the fold of the previous update is
            still running, an update is coalesced into the next one instead of waited for, which folds the newest
            weights with `beta ** k` for the `k` steps since the last fold (the `update_every` rule, exact for the
            intervals taken). Once `k` would reach this many optimizer steps the update waits for the fold
            instead. 32 is far inside the usual horizons (0.999: about 1,000 steps); lower it for short ones. Must
            be at least `update_every`.
        start_step (`int`, *optional*, defaults to 0):
            Up to and including this optimizer step the EMA copies the weights instead of averaging them.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"float32"`):
            dtype of the EMA tensors, whatever the dtype the model trains in. Keep float32: a bfloat16 EMA loses
            every update smaller than half a bf16 ulp.
        device (`str`, *optional*):
            Where the EMA lives: `None` (the weights' own device) or `"cpu"` (offloaded: the weights are copied into
            reusable pinned host buffers and folded in on the CPU).
        async_update (`bool`, *optional*):
            Fold an offloaded EMA in a background thread while training continues (at most one update in flight;
            the next update and every read of the EMA wait for it). Needs `device="cpu"`. `None` means on when the
            EMA is offloaded from an accelerator, off otherwise.
        cuda_stream (`bool`, *optional*, defaults to `False`):
            On CUDA, run the update (or the device-to-host copies of an offloaded EMA) on a side stream that
            overlaps with the next forward/backward; the next optimizer step waits for it. No effect on CPU.
        trainable_only (`bool`, *optional*):
            Average only parameters with `requires_grad=True`. `None` means: `True` for a PEFT model (only the
            adapter), `False` otherwise.
        include (`list[str]`, *optional*):
            Regular expressions (`re.search` on the tensor name); only matching tensors are averaged. Each must
            match at least one tensor.
        exclude (`list[str]`, *optional*):
            Regular expressions; matching tensors are not averaged. Each must match at least one tensor.
        include_buffers (`bool`, *optional*, defaults to `True`):
            Also average floating-point persistent buffers (non-float buffers are always copied).
        shard_across_ranks (`bool`, *optional*):
            For a replicated (DDP) model, split the EMA across data-parallel ranks: each rank averages only its
            1/N chunk of each flattened tensor, and the chunks are gathered when the EMA is saved or swapped in, so
            the EMA costs 1/N of a full copy per rank. `None` means on when `torch.distributed` runs more than one
            rank; then build the EMA on every rank (its construction checks that all ranks track the same
            tensors): `update()` stays local, while `swapped()`, `copy_to()` and saving are collective calls that
            every rank must make. Sharded models (FSDP, ZeRO-3) always keep the EMA of their own shards.
        on_nonfinite (`str`, *optional*, defaults to `"skip"`):
            What an update does when a weight it would read is NaN or inf: `"skip"` leaves the EMA as it was (the
            average of the finite steps), counts the skip (`ModelEMA.num_skipped`, logged as
            `ema_skipped_updates`) and logs a warning; `"raise"` does the same, then raises
            [`NonFiniteWeightsError`] naming the step and the first non-finite tensor; `"ignore"` does not check
            (a NaN then stays in the EMA for good). Under sharding every rank skips the same updates. The check is
            fused into the native CPU kernel; other kernels read the weights once more before the update.
    """

    decay: float | None = None
    half_life: float | None = None
    sigma_rel: float | None = None
    bema: BEMAConfig | bool | dict | None = None
    warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    update_every: int = 1
    max_update_interval: int = 32
    start_step: int = 0
    dtype: str = "float32"
    device: str | None = None
    trainable_only: bool | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    include_buffers: bool = True
    async_update: bool | None = None
    cuda_stream: bool = False
    shard_across_ranks: bool | None = None
    on_nonfinite: str = "skip"
    # Filled in by `__post_init__`: the exponent of the power-function profile when `sigma_rel` is set.
    gamma: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._check_bema()
        given = [name for name in ("decay", "half_life", "sigma_rel") if getattr(self, name) is not None]
        if len(given) > 1:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in given)
            raise ConfigError(f"set the EMA horizon in exactly one way, got {values}")
        if self.decay is not None:
            check_number("decay", self.decay)
            if not 0.0 <= self.decay < 1.0:
                raise ConfigError(f"`decay` must be in [0, 1), got {self.decay!r}")
        if self.half_life is not None:
            check_number("half_life", self.half_life)
            if self.half_life <= 0:
                raise ConfigError(f"`half_life` must be > 0 optimizer steps, got {self.half_life!r}")
        if self.sigma_rel is not None:
            check_number("sigma_rel", self.sigma_rel)
            check_sigma_rel("`sigma_rel`", self.sigma_rel)
            if self.warmup:
                raise ConfigError(
                    f"`warmup` cannot be combined with `sigma_rel` (the power-function profile has its own warmup), "
                    f"got warmup={self.warmup!r}, sigma_rel={self.sigma_rel!r}"
                )
            self.gamma = gamma_from_sigma_rel(self.sigma_rel)
        check_bool("warmup", self.warmup)
        for name in ("inv_gamma", "power"):
            check_number(name, getattr(self, name))
            if getattr(self, name) <= 0:
                raise ConfigError(f"`{name}` must be > 0, got {getattr(self, name)!r}")
        check_number("min_decay", self.min_decay)
        if not 0.0 <= self.min_decay <= self.base_decay:
            raise ConfigError(f"`min_decay` must be in [0, decay={self.base_decay!r}], got {self.min_decay!r}")
        check_int("update_every", self.update_every, minimum=1)
        check_int("max_update_interval", self.max_update_interval, minimum=1)
        if self.max_update_interval < self.update_every:
            raise ConfigError(
                f"`max_update_interval` must be at least `update_every` ({self.update_every}), got "
                f"{self.max_update_interval!r}"
            )
        check_int("start_step", self.start_step, minimum=0)
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"`dtype` must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            if isinstance(self.device, torch.device):
                self.device = str(self.device)
            if not isinstance(self.device, str):
                raise ConfigTypeError(f"`device` must be None or a device string such as 'cpu', got {self.device!r}")
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"`device` must be None or a device string such as 'cpu', got {self.device!r}"
                ) from None
        check_optional_bool("trainable_only", self.trainable_only)
        check_bool("include_buffers", self.include_buffers)
        check_optional_bool("async_update", self.async_update)
        if self.async_update and self.device != "cpu":
            raise ConfigError(f"`async_update=True` needs `device='cpu'` (offloaded), got device={self.device!r}")
        check_bool("cuda_stream", self.cuda_stream)
        check_optional_bool("shard_across_ranks", self.shard_across_ranks)
        if not isinstance(self.on_nonfinite, str):
            raise ConfigTypeError(
                f"`on_nonfinite` must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r} of type "
                f"{type(self.on_nonfinite).__name__}"
            )
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"`on_nonfinite` must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude)

    def _check_bema(self) -> None:
        bema = self.bema = coerce_config("bema", self.bema, BEMAConfig)
        if bema is None:
            return
        clash = {name: getattr(self, name) for name in ("decay", "half_life", "sigma_rel") if getattr(self, name)}
        if self.warmup:
            clash["warmup"] = self.warmup
        if self.start_step not in (0, bema.tau):
            clash["start_step"] = self.start_step
        if clash:
            values = ", ".join(f"{k}={v!r}" for k, v in clash.items())
            raise ConfigError(
                f"`bema` sets its own schedule and burn-in (`bema.tau`): it cannot be combined with {values}"
            )
        # The burn-in is the EMA's start: up to and including `tau` it copies the weights (and snapshots theta_0).
        self.start_step = bema.tau

    @property
    def bema_config(self) -> BEMAConfig | None:
        """The [`BEMAConfig`] when the EMA is bias-corrected, else `None`."""
        return self.bema if isinstance(self.bema, BEMAConfig) else None

    @classmethod
    def resolve(cls, config: EMAConfig | None, kwargs: dict[str, Any]) -> EMAConfig:
        """The config of an API taking either `config=` or the config's fields as keyword arguments.

        Args:
            config (`EMAConfig`, *optional*): A ready config.
            kwargs (`dict`): Config fields, used when `config` is None.
        """
        if config is None:
            return cls(**kwargs)
        if kwargs:
            raise ConfigTypeError(f"pass either `config` or config fields, not both; got extra {sorted(kwargs)!r}")
        if not isinstance(config, cls):
            raise ConfigTypeError(f"`config` must be an EMAConfig, got {type(config).__name__}")
        return config

    # ------------------------------------------------------------------ derived values
    @property
    def base_decay(self) -> float:
        """The per-optimizer-step decay set by `decay` or `half_life` (0.999 when neither is set).

        Meaningless for `sigma_rel`, whose decay depends on the step.
        """
        if self.decay is not None:
            return float(self.decay)
        if self.half_life is not None:
            return decay_from_half_life(self.half_life)
        return DEFAULT_DECAY

    @property
    def torch_dtype(self) -> torch.dtype:
        """The EMA dtype as a `torch.dtype`."""
        return _DTYPES[self.dtype]

    def decay_at(self, t: int, interval: int | None = None) -> float:
        """The `beta` of the update made `t` optimizer steps after the EMA started (`t >= 1`).

        It covers the whole interval since the previous update: `update_every` steps, or `interval` (coalesced
        updates of an offloaded EMA).

        Args:
            t (`int`): Optimizer steps since `start_step`, including the current one.
            interval (`int`, *optional*): Optimizer steps since the previous update; defaults to `update_every`.
        """
        k = self.update_every if interval is None else int(interval)
        bema = self.bema_config
        if bema is not None:
            # BEMA's EMA weight on the newest step is w_t: its decay is 1 - w_t, over k steps (1 - w_t) ** k.
            return (1.0 - bema.weight(t)) ** k
        if self.gamma is not None:  # set exactly when `sigma_rel` is
            return power_function_beta(t, self.gamma, interval=k)
        beta = self.base_decay
        if self.warmup:
            # `t - 1` so that the first update has decay 0 and the EMA starts at the weights (as diffusers does).
            beta = warmup_decay(t - 1, beta, self.inv_gamma, self.power, self.min_decay)
        return beta**k

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (the derived `gamma` included, for readers)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EMAConfig:
        """Build a config from `to_dict()` output, ignoring derived and unknown keys.

        Args:
            data (`dict`): The dict to read.
        """
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON.

        Args:
            path (`str` or `os.PathLike`): File to write.
        """
        write_json(path, self.to_dict(), sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EMAConfig:
        """Read a config written by `to_json_file`.

        Args:
            path (`str` or `os.PathLike`): File to read.
        """
        return cls.from_dict(read_json(path))


#: The fields that choose which tensors the EMA averages.
SELECTION_FIELDS = ("trainable_only", "include", "exclude", "include_buffers")
#: The fields that change what the EMA computes: its schedule (the decay of every update), its dtype and which
#: tensors it averages. The others say how and where it runs (`device`, `async_update`, `cuda_stream`,
#: `shard_across_ranks`) or what happens when the weights hold NaN (`on_nonfinite`), and may change on resume.
MATH_FIELDS = (
    "decay",
    "half_life",
    "sigma_rel",
    "bema",
    "warmup",
    "inv_gamma",
    "power",
    "min_decay",
    "update_every",
    "start_step",
    "dtype",
    *SELECTION_FIELDS,
)


@dataclass(frozen=True)
class FieldChange:
    """A field of [`EMAConfig`] with one value in a saved EMA and another now.

    Args:
        name (`str`): The field.
        old (`Any`): Its saved value.
        new (`Any`): Its value now.
    """

    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name} {self.old!r} -> {self.new!r}"


def config_changes(saved: dict[str, Any], config: EMAConfig) -> list[FieldChange]:
    """The fields of `MATH_FIELDS` whose value in `config` differs from the saved config.

    Args:
        saved (`dict`): A config as `EMAConfig.to_dict()` wrote it (a field it lacks, written by an older hf-ema,
            has its default).
        config (`EMAConfig`): The config now.

    Raises:
        `ConfigError`: `saved` is not a valid config.
    """
    old = EMAConfig.from_dict(saved)
    return [
        FieldChange(name, getattr(old, name), getattr(config, name))
        for name in MATH_FIELDS
        if getattr(old, name) != getattr(config, name)
    ]

"""EMAConfig: validation with clear messages, decay schedules against their formulas, JSON round trip."""

from __future__ import annotations

import math

import pytest
import torch

from hf_ema import ConfigError, ConfigTypeError, EMAConfig, HfEmaError

BAD_CONFIGS = [
    (dict(decay=1.0), "`decay` must be in [0, 1), got 1.0"),
    (dict(decay=-0.1), "`decay` must be in [0, 1), got -0.1"),
    (dict(decay="0.9"), "`decay` must be a number, got '0.9'"),
    (dict(decay=float("nan")), "`decay` must be finite, got nan"),
    (dict(decay=0.9, half_life=10), "exactly one way, got decay=0.9, half_life=10"),
    (dict(half_life=10, sigma_rel=0.05), "exactly one way, got half_life=10, sigma_rel=0.05"),
    (dict(half_life=0), "`half_life` must be > 0 optimizer steps, got 0"),
    (dict(sigma_rel=0.5), "`sigma_rel` must be in (0, 0.2887), got 0.5"),
    (dict(sigma_rel=0.05, warmup=True), "`warmup` cannot be combined with `sigma_rel`"),
    (dict(update_every=0), "`update_every` must be >= 1, got 0"),
    (dict(update_every=2.5), "`update_every` must be an int, got 2.5"),
    (dict(start_step=-1), "`start_step` must be >= 0, got -1"),
    (dict(dtype="int8"), "`dtype` must be one of ['bfloat16', 'float16', 'float32', 'float64'], got 'int8'"),
    (dict(device="gpu0"), "`device` must be None or a device string such as 'cpu', got 'gpu0'"),
    (dict(inv_gamma=0), "`inv_gamma` must be > 0, got 0"),
    (dict(power=-1.0), "`power` must be > 0, got -1.0"),
    (dict(decay=0.9, min_decay=0.95), "`min_decay` must be in [0, decay=0.9], got 0.95"),
    (dict(include=[]), "`include` must not be an empty list"),
    (dict(exclude=["("]), "`exclude` holds an invalid regular expression '('"),
    (dict(include=[3]), "`include` must be a regex string or a list of them, got [3]"),
    (dict(trainable_only="yes"), "`trainable_only` must be None or a bool, got 'yes'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_bad_config_is_rejected_with_argument_and_value(kwargs, message):
    with pytest.raises(HfEmaError) as info:
        EMAConfig(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))


def test_error_classes_are_value_and_type_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, HfEmaError)
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, HfEmaError)


def test_default_decay_and_half_life():
    assert EMAConfig().decay_at(5) == 0.999
    cfg = EMAConfig(half_life=100)
    # After `half_life` steps the weight of the starting value is one half.
    assert math.isclose(cfg.decay_at(1) ** 100, 0.5, rel_tol=1e-12)


def test_update_every_keeps_the_horizon():
    one = EMAConfig(decay=0.99)
    four = EMAConfig(decay=0.99, update_every=4)
    assert math.isclose(four.decay_at(8), one.decay_at(8) ** 4, rel_tol=1e-12)


def test_warmup_formula():
    cfg = EMAConfig(decay=0.999, warmup=True, inv_gamma=1.0, power=0.75)
    assert cfg.decay_at(1) == 0.0  # the first update copies the weights
    for t in (2, 10, 1000, 10**7):
        expected = min(0.999, 1 - (1 + (t - 1) / 1.0) ** -0.75)
        assert math.isclose(cfg.decay_at(t), expected, rel_tol=1e-12)
    assert cfg.decay_at(10**7) == 0.999


def test_sigma_rel_gamma_and_beta():
    # EDM2 (Karras et al. 2024, Eq. 123) pairs: gamma 16.97 -> sigma_rel 0.05; gamma 6.94 -> sigma_rel 0.10.
    assert abs(EMAConfig(sigma_rel=0.05).gamma - 16.97) < 0.01
    cfg = EMAConfig(sigma_rel=0.10)
    assert abs(cfg.gamma - 6.94) < 0.01
    g = cfg.gamma
    assert cfg.decay_at(1) == 0.0
    assert math.isclose(cfg.decay_at(50), (1 - 1 / 50) ** (g + 1), rel_tol=1e-12)
    every = EMAConfig(sigma_rel=0.10, update_every=10)
    assert math.isclose(every.decay_at(50), (1 - 10 / 50) ** (g + 1), rel_tol=1e-12)


def test_json_round_trip(tmp_path):
    cfg = EMAConfig(half_life=50, update_every=2, start_step=3, dtype=torch.float64, include=["proj"])
    cfg.to_json_file(tmp_path / "c.json")
    back = EMAConfig.from_json_file(tmp_path / "c.json")
    assert back == cfg
    assert back.dtype == "float64" and back.torch_dtype is torch.float64

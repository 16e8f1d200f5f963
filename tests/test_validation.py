"""The shared argument checks (`hf_ema/utils/validation.py`) and JSON I/O (`hf_ema/utils/jsonio.py`)."""

from __future__ import annotations

import math

import pytest

from hf_ema import CheckpointError, ConfigError, ConfigTypeError, EMACallback, PostHocConfig, StabilityConfig
from hf_ema.utils.jsonio import read_json, write_json
from hf_ema.utils.validation import (
    check_bool,
    check_int,
    check_number,
    check_optional_bool,
    check_size,
    coerce_config,
)


def test_bool_is_never_a_number():
    for check in (lambda v: check_int("steps", v), lambda v: check_number("decay", v)):
        with pytest.raises(ConfigTypeError, match=r"`(steps|decay)` must be an? (int|number), got True of type bool"):
            check(True)
    assert check_int("steps", 3, minimum=1) == 3
    assert check_number("decay", 0.5, minimum=0.0, maximum=1.0, max_inclusive=False) == 0.5
    assert check_size("max_shard_size", "5GB") == "5GB" and check_size("max_shard_size", None, optional=True) is None


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: check_int("steps", 0, minimum=1), ConfigError, "`steps` must be >= 1, got 0"),
        (lambda: check_int("steps", 9, maximum=8), ConfigError, "`steps` must be <= 8, got 9"),
        (lambda: check_int("steps", 2.0), ConfigTypeError, "`steps` must be an int, got 2.0 of type float"),
        (lambda: check_number("decay", math.nan), ConfigError, "`decay` must be finite, got nan"),
        (lambda: check_number("decay", 1.0, minimum=0, maximum=1, max_inclusive=False), ConfigError, "[0, 1)"),
        (lambda: check_number("m", 0.0, minimum=0, maximum=1, min_inclusive=False), ConfigError, "(0, 1]"),
        (lambda: check_bool("flag", 1), ConfigTypeError, "`flag` must be a bool, got 1 of type int"),
        (lambda: check_optional_bool("flag", "yes"), ConfigTypeError, "`flag` must be None or a bool, got 'yes'"),
        (lambda: check_size("max_shard_size", "5 parsecs"), ConfigError, "a positive size such as '5GB'"),
        (lambda: check_size("max_shard_size", 0), ConfigError, "`max_shard_size` must be a positive size"),
        (lambda: check_size("max_shard_size", True), ConfigTypeError, "`max_shard_size` must be a size"),
        (lambda: check_size("max_shard_size", 2.5), ConfigTypeError, "got 2.5"),
    ],
)
def test_checks_name_the_argument_and_the_value(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_bool_dict_or_config_arguments():
    assert coerce_config("stability_metrics", None, StabilityConfig) is None
    assert coerce_config("stability_metrics", False, StabilityConfig) is None
    assert coerce_config("stability_metrics", True, StabilityConfig) == StabilityConfig()
    config = StabilityConfig(sample_size=8)
    assert coerce_config("stability_metrics", config, StabilityConfig) is config
    assert coerce_config("posthoc", {"update_every": 2}, PostHocConfig).update_every == 2
    with pytest.raises(ConfigTypeError, match=r"`posthoc` has unknown fields \['every'\]"):
        coerce_config("posthoc", {"every": 2}, PostHocConfig)
    with pytest.raises(ConfigTypeError, match="`stability_metrics` must be a bool, a dict or a StabilityConfig"):
        coerce_config("stability_metrics", "yes", StabilityConfig)


def test_callback_flags_are_checked_before_training():
    for flag in ("save_final", "eval_ema", "swap_at_end", "allow_ema_restart"):
        with pytest.raises(ConfigTypeError, match=f"`{flag}` must be a bool, got 'no'"):
            EMACallback(decay=0.9, **{flag: "no"})
    with pytest.raises(ConfigTypeError, match="`resume_from` must be a path, got 3"):
        EMACallback(decay=0.9, resume_from=3)


def test_json_round_trip_and_damaged_file(tmp_path):
    path = write_json(tmp_path / "state.json", {"b": 1, "a": [1.5, "x"]}, sort_keys=True)
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    "x"\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [1.5, "x"], "b": 1}
    path.write_text('{"a": ')  # a write cut short
    with pytest.raises(CheckpointError, match=r"could not read `.*state\.json`: JSONDecodeError"):
        read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")

"""Argument checks shared by every public entry point: one rule each, one message shape.

Each check raises [`ConfigTypeError`] (a `TypeError`) for a value of the wrong type and [`ConfigError`] (a
`ValueError`) for a value out of range, naming the argument and the value, and returns the value (narrowed), so a
caller writes `steps = check_int("max_steps", max_steps, minimum=1)`. `bool` is never accepted as a number: `True`
is an `int` to Python, never a step count to a user.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, TypeVar

from ..errors import ConfigError, ConfigTypeError

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "check_optional_bool",
    "check_path",
    "check_size",
    "coerce_config",
    "is_number",
]

C = TypeVar("C")


def _type_name(value: Any) -> str:
    return type(value).__name__


def is_number(value: Any) -> bool:
    """Whether `value` is a real number (an `int` or `float`, not a `bool`).

    Args:
        value (`Any`): The value.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a `bool`.

    Args:
        name (`str`): The argument's name, for the message.
        value (`Any`): The value.

    Raises:
        `ConfigTypeError`: `value` is not a `bool`.
    """
    if not isinstance(value, bool):
        raise ConfigTypeError(f"`{name}` must be a bool, got {value!r} of type {_type_name(value)}")
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    """`value` if it is a `bool` or `None` (for "decide automatically").

    Args:
        name (`str`): The argument's name, for the message.
        value (`Any`): The value.

    Raises:
        `ConfigTypeError`: `value` is neither a `bool` nor `None`.
    """
    if value is not None and not isinstance(value, bool):
        raise ConfigTypeError(f"`{name}` must be None or a bool, got {value!r} of type {_type_name(value)}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an `int` (not a `bool`) within `[minimum, maximum]`.

    Args:
        name (`str`): The argument's name, for the message.
        value (`Any`): The value.
        minimum (`int`, *optional*): The smallest allowed value.
        maximum (`int`, *optional*): The largest allowed value.

    Raises:
        `ConfigTypeError`: `value` is not an `int`.
        `ConfigError`: `value` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"`{name}` must be an int, got {value!r} of type {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"`{name}` must be <= {maximum}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    finite: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """`value` if it is a real number (an `int` or `float`, not a `bool`) within the given bounds.

    Args:
        name (`str`): The argument's name, for the message.
        value (`Any`): The value.
        finite (`bool`, *optional*, defaults to `True`): Refuse NaN and infinities.
        minimum (`float`, *optional*): The lower bound.
        maximum (`float`, *optional*): The upper bound.
        min_inclusive (`bool`, *optional*, defaults to `True`): Whether `minimum` itself is allowed.
        max_inclusive (`bool`, *optional*, defaults to `True`): Whether `maximum` itself is allowed.

    Raises:
        `ConfigTypeError`: `value` is not a number.
        `ConfigError`: `value` is not finite, or out of range.
    """
    if not is_number(value):
        raise ConfigTypeError(f"`{name}` must be a number, got {value!r} of type {_type_name(value)}")
    if finite and not math.isfinite(value):
        raise ConfigError(f"`{name}` must be finite, got {value!r}")
    low_ok = minimum is None or (value >= minimum if min_inclusive else value > minimum)
    high_ok = maximum is None or (value <= maximum if max_inclusive else value < maximum)
    if not (low_ok and high_ok):
        left = "-inf" if minimum is None else f"{minimum:g}"
        right = "inf" if maximum is None else f"{maximum:g}"
        interval = f"{'[' if min_inclusive and minimum is not None else '('}{left}, {right}"
        interval += "]" if max_inclusive and maximum is not None else ")"
        raise ConfigError(f"`{name}` must be in {interval}, got {value!r}")
    return value


def check_path(name: str, value: Any, optional: bool = False) -> str | os.PathLike | None:
    """`value` if it is a path (`str` or `os.PathLike`), or `None` when `optional`.

    Args:
        name (`str`): The argument's name, for the message.
        value (`Any`): The value.
        optional (`bool`, *optional*, defaults to `False`): Whether `None` is allowed.

    Raises:
        `ConfigTypeError`: `value` is not a path.
    """
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigTypeError(f"`{name}` must be a path, got {value!r} of type {_type_name(value)}")
    return value


def coerce_config(name: str, value: Any, cls: type[C]) -> C | None:
    """The "bool, dict or config" arguments (`stability_metrics=`, `posthoc=`): `None` or `False` is off, `True`
    the defaults, a dict the fields of `cls`, an instance of `cls` itself.

    Args:
        name (`str`): The argument's name, for the message.
        value (`bool`, `dict`, `cls` or `None`): What the user passed.
        cls (`type`): The config dataclass (its constructor validates the fields).

    Raises:
        `ConfigTypeError`: `value` is none of these, or the dict names a field `cls` does not have.
    """
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls) if f.init}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigTypeError(
                    f"`{name}` has unknown fields {unknown}; {cls.__name__} takes {sorted(known)}, got {value!r}"
                )
        return cls(**value)
    raise ConfigTypeError(f"`{name}` must be a bool, a dict or a {cls.__name__}, got {value!r}")


def check_size(name: str, value: Any, optional: bool = False) -> int | str | None:
    """Check a file size written as `save_pretrained`'s `max_shard_size` is: a positive number of bytes, or a
    string such as `"5GB"` (powers of 1000) or `"500MiB"` (powers of 1024).

    Args:
        name (`str`): The argument's name.
        value (`Any`): Its value.
        optional (`bool`, *optional*, defaults to `False`): Accept `None`.
    """
    if value is None and optional:
        return None
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise ConfigTypeError(f"`{name}` must be a size such as '5GB' or a number of bytes, got {value!r}")
    # Here, not at the top: `safetensors_files` imports torch, which the CLI's parsers (`hf-ema env`) never need.
    from .safetensors_files import parse_size

    try:
        parse_size(value)
    except ValueError:
        raise ConfigError(
            f"`{name}` must be a positive size such as '5GB' or a number of bytes, got {value!r}"
        ) from None
    return value

"""A request's generation settings and prompt, checked before any work starts.

Usable without Gradio. Every variant of a request decodes with these settings (`serve.batching.decode`); each samples
with its own `torch.Generator` seeded with the request's seed, so a request's output does not depend on what else
runs at the same time, and greedy decoding gives exactly what `model.generate(do_sample=False)` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hf_ema.errors import ConfigError, ConfigTypeError

from .loading import ModelPair

__all__ = [
    "MAX_NEW_TOKENS_LIMIT",
    "MAX_SEED",
    "GenerationSettings",
    "encode_prompt",
    "validate_prompt",
]

#: Default upper bound on `max_new_tokens` (the app's bound can be set lower or higher).
MAX_NEW_TOKENS_LIMIT = 512
MAX_SEED = 2**32 - 1


def _as_int(name: str, value, minimum: int, maximum: int) -> int:
    # Web forms send numbers as floats: accept 7.0, reject 7.5, NaN and booleans.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"`{name}` must be an integer, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ConfigError(f"`{name}` must be a whole number, got {value!r}")
        value = int(value)
    if not minimum <= value <= maximum:
        raise ConfigError(f"`{name}` must be between {minimum} and {maximum}, got {value!r}")
    return value


def _as_float(name: str, value, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"`{name}` must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ConfigError(f"`{name}` must be in {interval}, got {value!r}")
    return value


@dataclass
class GenerationSettings:
    """Sampling settings shared by the raw and the EMA model; validated when built.

    Args:
        max_new_tokens (`int`, *optional*, defaults to 64): Tokens to generate, 1 to `max_new_tokens_limit`.
        temperature (`float`, *optional*, defaults to 0.8): Softmax temperature, in (0, 5]; unused when greedy.
        top_p (`float`, *optional*, defaults to 0.95): Nucleus sampling mass, in (0, 1]; unused when greedy.
        seed (`int`, *optional*, defaults to 0): Seed of both models' samplers, 0 to 2**32 - 1.
        greedy (`bool`, *optional*, defaults to `False`): Take the most likely token (no sampling).
        max_new_tokens_limit (`int`, *optional*, defaults to `MAX_NEW_TOKENS_LIMIT`): Upper bound on
            `max_new_tokens`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    greedy: bool = False
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT

    def __post_init__(self) -> None:
        self.max_new_tokens_limit = _as_int("max_new_tokens_limit", self.max_new_tokens_limit, 1, 10**6)
        self.max_new_tokens = _as_int("max_new_tokens", self.max_new_tokens, 1, self.max_new_tokens_limit)
        self.seed = _as_int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.greedy, bool):
            raise ConfigTypeError(f"`greedy` must be a bool, got {self.greedy!r}")
        self.temperature = _as_float("temperature", self.temperature, 0.0, 5.0, low_open=True)
        self.top_p = _as_float("top_p", self.top_p, 0.0, 1.0, low_open=True)

    def decode_kwargs(self) -> dict[str, Any]:
        """The arguments of `serve.batching.decode` these settings fix."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "greedy": self.greedy,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def validate_prompt(prompt) -> str:
    """Check that `prompt` is a non-empty string and return it.

    Args:
        prompt (`str`): The prompt.
    """
    if not isinstance(prompt, str):
        raise ConfigTypeError(f"`prompt` must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ConfigError("`prompt` must not be empty, got an empty prompt; type some text to continue")
    return prompt


def encode_prompt(pair: ModelPair, prompt: str, settings: GenerationSettings) -> torch.Tensor:
    """The prompt's token ids, `(1, length)` on the models' device, checked to leave room for `max_new_tokens`.

    Args:
        pair (`ModelPair`): The loaded models (tokenizer and context length).
        prompt (`str`): The prompt.
        settings (`GenerationSettings`): The request's settings.
    """
    input_ids = pair.tokenizer(prompt, return_tensors="pt")["input_ids"]
    n_prompt = input_ids.shape[1]
    if n_prompt == 0:
        raise ConfigError(f"`prompt` encodes to no tokens, got {prompt!r}")
    limit = pair.context_length
    if limit is not None and n_prompt >= limit:  # no room for even one new token, whatever `max_new_tokens` is
        raise ConfigError(
            f"`prompt` is too long for the model's context of {limit} tokens: it is {n_prompt} tokens, "
            f"{n_prompt - limit + 1} more than leave room for one new token; shorten it"
        )
    if limit is not None and n_prompt + settings.max_new_tokens > limit:
        raise ConfigError(
            f"`max_new_tokens` must be at most {limit - n_prompt} for this {n_prompt}-token prompt "
            f"(the model's context is {limit} tokens), got {settings.max_new_tokens}"
        )
    return input_ids.to(pair.device)

"""Decoding every variant of a [`VariantBatch`] in lockstep, and scoring texts under every variant.

Each variant's rows see the computation the variant alone would do (the batched kernels may round differently in
the last bits), so greedy decoding gives what `model.generate(do_sample=False)` gives and seeded sampling what
`generate(do_sample=True)` gives after `torch.manual_seed(seed)`; the tests check both against models run alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hf_ema import ConfigError

from .runners import VariantBatch

__all__ = ["DecodeState", "decode", "score_continuations"]

#: Scoring passes keep their logits under about this many floats (a pass holds every variant's rows).
_SCORE_LOGITS_BUDGET = 64 * 2**20


@dataclass
class DecodeState:
    """The tokens generated so far by each variant.

    Args:
        tokens (`list[list[int]]`): Per variant, the new token ids (an end-of-sequence token included).
        finished (`list[bool]`): Per variant, whether it has stopped (end-of-sequence or `max_new_tokens`).
        own_nll (`list[list[float]]`, *optional*): With `decode(..., score_own=True)`: per variant, each new token's
            negative log-likelihood under the variant's own model (temperature 1); `None` otherwise.
    """

    tokens: list[list[int]]
    finished: list[bool] = field(default_factory=list)
    own_nll: list[list[float]] | None = None


def decode(
    batch: VariantBatch,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    score_own: bool = False,
) -> Iterator[DecodeState]:
    """Decode every variant of `batch` from the same prompt in lockstep: one batched forward pass per token.

    Each variant samples with its own `torch.Generator` seeded with `seed` and the warpers `generate` uses, in the
    same order, so each variant's tokens are what `generate` gives for it alone: `do_sample=False` when `greedy`,
    else `do_sample=True, temperature=..., top_p=..., top_k=0` after `torch.manual_seed(seed)`.

    Args:
        batch (`VariantBatch`): The variants.
        input_ids (`torch.Tensor`): The prompt, shape `(1, length)`.
        max_new_tokens (`int`): Tokens to generate per variant.
        greedy (`bool`): Take the most likely token.
        temperature (`float`, *optional*, defaults to 1.0): Softmax temperature when sampling.
        top_p (`float`, *optional*, defaults to 1.0): Nucleus mass when sampling.
        seed (`int`, *optional*, defaults to 0): Seed of every variant's sampler.
        eos_token_ids (`set[int]`, *optional*): Tokens that end a variant's text.
        score_own (`bool`, *optional*, defaults to `False`): Also keep each token's negative log-likelihood under its
            own variant's model (`DecodeState.own_nll`), taken from the decoding logits: the diagonal of the score
            matrix, which [`score_continuations`] can then skip.

    Yields:
        `DecodeState`: after every token (the same object, updated).
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    n = batch.n
    warpers = LogitsProcessorList()
    if not greedy:
        # The same warpers, in the same order, as `generate(do_sample=True, temperature=..., top_p=...)`.
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(n)]
    input_ids = input_ids.to(batch.device)
    history = [input_ids for _ in range(n)]
    state = DecodeState(tokens=[[] for _ in range(n)], finished=[False] * n)
    if score_own:
        state.own_nll = [[] for _ in range(n)]
    cache = batch.new_cache()
    step_input = input_ids.expand(n, -1)
    for step in range(max_new_tokens):
        logits = batch.forward(step_input, cache, last_only=True)[:, -1, :].float()
        if greedy:
            chosen = logits.argmax(dim=-1).tolist()
        else:
            chosen = []
            for v in range(n):
                if state.finished[v]:
                    chosen.append(0)
                    continue
                scores = warpers(history[v], logits[v : v + 1])
                probs = torch.softmax(scores, dim=-1).cpu()
                chosen.append(int(torch.multinomial(probs, num_samples=1, generator=generators[v])))
        if score_own:
            # The float32 cross-entropy `score_continuations` takes, here from the decoding step's logits.
            target = torch.tensor([0 if state.finished[v] else int(chosen[v]) for v in range(n)], device=logits.device)
            own = F.cross_entropy(logits, target, reduction="none").double().cpu().tolist()
            for v in range(n):
                if not state.finished[v]:
                    state.own_nll[v].append(own[v])
        feed = []
        for v in range(n):
            if state.finished[v]:
                feed.append(state.tokens[v][-1])  # keeps the batch rectangular; its output is ignored
                continue
            token = int(chosen[v])
            state.tokens[v].append(token)
            feed.append(token)
            if token in eos_token_ids:
                state.finished[v] = True
            elif not greedy:
                history[v] = torch.cat([history[v], history[v].new_tensor([[token]])], dim=-1)
        if step == max_new_tokens - 1:
            state.finished = [True] * n
        yield state
        if all(state.finished):
            return
        step_input = torch.tensor(feed, device=batch.device).unsqueeze(1)


@torch.inference_mode()
def score_continuations(
    batch: VariantBatch,
    prompt_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    *,
    skip: Collection[tuple[int, int]] = frozenset(),
) -> tuple[torch.Tensor, list[list[list[float]]]]:
    """Negative log-likelihood of each continuation of the prompt under each variant.

    The score of continuation `c` under variant `v` is what `model_v(input_ids=prompt + c, labels=[-100] * len(prompt)
    + c).loss` gives: the mean over `c`'s tokens of `-log p(token | prompt, earlier tokens)`. Continuations of the
    same length share batched forward passes (all variants, no padding), as many as fit in about
    `_SCORE_LOGITS_BUDGET` logits per pass.

    Args:
        batch (`VariantBatch`): The variants.
        prompt_ids (`Sequence[int]`): The prompt's token ids (at least one).
        continuations (`Sequence[Sequence[int]]`): Token ids to score, each non-empty.
        skip (`Collection[tuple[int, int]]`, *optional*): `(variant, continuation)` pairs not to score (already known,
            such as each variant's own text from [`decode`]`(..., score_own=True)`): their entry is NaN and their
            token list empty.

    Returns:
        `tuple`: the mean NLL matrix `(variants, continuations)` (float64) and, per variant and continuation, each
        token's NLL.
    """
    if not prompt_ids:
        raise ConfigError("`prompt_ids` must hold at least one token, got none")
    n = batch.n
    nll = torch.full((n, len(continuations)), math.nan, dtype=torch.float64)
    per_token: list[list[list[float]]] = [[[] for _ in continuations] for _ in range(n)]
    by_length: dict[int, list[int]] = {}
    for j, cont in enumerate(continuations):
        if not cont:
            raise ConfigError(f"`continuations[{j}]` must hold at least one token, got none")
        by_length.setdefault(len(cont), []).append(j)
    vocab = getattr(getattr(batch.model, "config", None), "vocab_size", None) or 32_000
    # Position t predicts token t + 1: the continuation's tokens are predicted from len(prompt) - 1 on.
    start = len(prompt_ids) - 1
    for length, members in by_length.items():
        total = len(prompt_ids) + length
        wanted = [[j for j in members if (v, j) not in skip] for v in range(n)]
        per_pass = max(1, _SCORE_LOGITS_BUDGET // (n * total * vocab))
        for first in range(0, max(len(w) for w in wanted), per_pass):
            chunks = [w[first : first + per_pass] for w in wanted]
            k = max(len(c) for c in chunks)
            # Variant-major, k rows per variant; a variant with fewer rows to score repeats one (output ignored).
            rows = [list(prompt_ids) + list(continuations[j]) for c in chunks for j in c + [members[0]] * (k - len(c))]
            ids = torch.tensor(rows, device=batch.device)
            logits = batch.forward(ids, None).float()
            pred = logits[:, start : total - 1, :]
            target = ids[:, len(prompt_ids) :]
            token_nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
            token_nll = token_nll.reshape(ids.shape[0], length).double().cpu()
            for v, chunk in enumerate(chunks):
                for a, j in enumerate(chunk):
                    row = token_nll[v * k + a]
                    nll[v, j] = row.mean()
                    per_token[v][j] = row.tolist()
    return nll, per_token

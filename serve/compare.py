"""One comparison request: up to four variants decoded together, then scored against each other.

Usable without Gradio. [`stream_comparison`] yields a [`Comparison`] after every token (texts only) and a last one
with the scores: the mean per-token negative log-likelihood of every pane's text under every pane's model, each
model's loss on an optional reference text, each token's probability under its own model, and the first token
where the panes differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_ema import CheckpointError, ConfigError, ConfigTypeError, HfEmaError

from .batching import DecodeState, VariantBatch, decode, score_continuations
from .generation import GenerationSettings, encode_prompt, validate_prompt
from .loading import ModelPair
from .specs import MAX_PANES, VariantSpec
from .tokens import TokenPieces, first_divergence
from .variants import Variant, VariantStore

__all__ = [
    "Comparison",
    "PaneResult",
    "compare",
    "generate_pair",
    "stream_comparison",
    "stream_pair",
]


logger = logging.getLogger(__name__)


@dataclass
class PaneResult:
    """One pane of a comparison.

    Args:
        spec (`VariantSpec`): What the pane asked for.
        label (`str`): Its title.
        command (`str`): The command that produces its weights.
        note (`str`): Extra facts (post-hoc fit error, merge weights).
        error (`str`): Why the pane could not be built (then it has no text); empty otherwise.
        tokens (`list[int]`): The generated token ids (an end-of-sequence token included).
        text (`str`): The decoded continuation.
        pieces (`list[str]`): The text of each token (they concatenate to `text`; special tokens as their name).
        probs (`list[float]`): Each token's probability under this pane's own model (temperature 1), once scored.
    """

    spec: VariantSpec
    label: str = ""
    command: str = ""
    note: str = ""
    error: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    pieces: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)


@dataclass
class Comparison:
    """The state of a comparison request.

    Args:
        panes (`list[PaneResult]`): One per requested variant, in order.
        nll (`list[list[float]]`, *optional*): `nll[i][j]`: the mean per-token negative log-likelihood (nats) of pane
            `j`'s text under pane `i`'s model, over the panes that generated (see `scored`); `None` until scored.
        reference_nll (`list[float]`, *optional*): Each scored pane's model's mean NLL on the reference text.
        scored (`list[int]`): Indices of the panes in `nll` (the panes without an error).
        divergence (`int`, *optional*): Index of the first token where the generated panes differ; `None` when they
            agree on every token (or fewer than two generated).
        done (`bool`): Whether this is the final state.
        status (`str`): What is happening now (building a variant, generating, scoring).
    """

    panes: list[PaneResult]
    nll: list[list[float]] | None = None
    reference_nll: list[float] | None = None
    scored: list[int] = field(default_factory=list)
    divergence: int | None = None
    done: bool = False
    status: str = ""

    def perplexity(self, nll: float) -> float:
        """`exp(nll)`, the perplexity for a mean NLL in nats (inf when it overflows).

        Args:
            nll (`float`): A mean negative log-likelihood.
        """
        return math.exp(nll) if nll < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON data (what the app's `/compare` and `/generate` endpoints return): `texts` (one
        per pane, `""` for a pane that could not be built), `panes` (each pane's `variant`, `label`, `text`,
        `error`, `command`, `note`, `tokens` and each token's probability `token_probs`), `scores` (`scores[i][j]`:
        the mean per-token NLL of pane `scored[j]`'s text under pane `scored[i]`'s model), `scored`,
        `reference_scores` and `divergence` (the first token where the panes' texts differ, or `None`)."""
        panes = [
            {
                "variant": str(pane.spec),
                "label": pane.label,
                "text": pane.text,
                "error": pane.error,
                "command": pane.command,
                "note": pane.note,
                "tokens": list(pane.tokens),
                "token_probs": list(pane.probs),
            }
            for pane in self.panes
        ]
        return {
            "texts": [pane.text for pane in self.panes],
            "panes": panes,
            "scores": self.nll,
            "scored": list(self.scored),
            "reference_scores": self.reference_nll,
            "divergence": self.divergence,
        }


@dataclass
class _Request:
    """A comparison request, checked before any work starts: the variants, the settings and the encoded texts."""

    specs: list[VariantSpec]
    settings: GenerationSettings
    checkpoint: str
    pair: ModelPair
    input_ids: torch.Tensor
    reference_ids: list[int]

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[0].tolist()


def _parse_specs(specs: Sequence[VariantSpec | str]) -> list[VariantSpec]:
    if isinstance(specs, (str, VariantSpec)) or not isinstance(specs, Sequence):
        raise ConfigTypeError(f"`variants` must be a list of variants, got {specs!r}")
    if not 1 <= len(specs) <= MAX_PANES:
        raise ConfigError(f"`variants` must hold 1 to {MAX_PANES} variants, got {len(specs)}")
    return [s if isinstance(s, VariantSpec) else VariantSpec.parse(s) for s in specs]


def _check_request(
    store: VariantStore,
    prompt: str,
    variants: Sequence[VariantSpec | str],
    settings: GenerationSettings | None,
    checkpoint: str | None,
    reference: str | None,
) -> _Request:
    settings = GenerationSettings() if settings is None else settings
    if not isinstance(settings, GenerationSettings):
        raise ConfigTypeError(f"`settings` must be a GenerationSettings, got {type(settings).__name__}")
    prompt = validate_prompt(prompt)
    specs = _parse_specs(variants)
    if reference is not None and not isinstance(reference, str):
        raise ConfigTypeError(f"`reference` must be a string, got {type(reference).__name__}")
    pair = store.catalog.get(checkpoint)
    input_ids = encode_prompt(pair, prompt, settings)
    reference_ids: list[int] = []
    if reference is not None and reference.strip():
        reference_ids = pair.tokenizer(reference, add_special_tokens=False)["input_ids"]
        limit = pair.context_length
        if not reference_ids:
            raise ConfigError(f"`reference` encodes to no tokens, got {reference!r}")
        if limit is not None and input_ids.shape[1] + len(reference_ids) > limit:
            raise ConfigError(
                f"`reference` must fit in the model's context with the prompt ({limit} tokens); it is "
                f"{len(reference_ids)} tokens after a {input_ids.shape[1]}-token prompt"
            )
    label = store.catalog.ref(checkpoint).label
    return _Request(specs, settings, label, pair, input_ids, reference_ids)


def _pane_error(spec: VariantSpec, err: Exception) -> HfEmaError:
    """`err` as the one-line `HfEmaError` a pane shows. A library error already is one; anything else (a `ValueError`
    from the math for a width too small to compute...) is logged as one line, without a traceback, and wrapped."""
    if isinstance(err, HfEmaError):
        return err
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    logger.warning("pane %s could not be built: %s: %s", spec, type(err).__name__, first_line)
    kind = ConfigError if isinstance(err, (ValueError, TypeError)) else CheckpointError
    return kind(f"could not build `{spec}`: {first_line}")


def _build_variants(
    store: VariantStore,
    request: _Request,
    result: Comparison,
    on_build: Callable[[int, VariantSpec], None] | None,
) -> Generator[Comparison, None, list[tuple[int, Variant]]]:
    """Build each pane's variant (yielding after each); a pane that cannot be built gets its reason instead."""
    built: list[tuple[int, Variant]] = []
    first_error: HfEmaError | None = None
    for i, spec in enumerate(request.specs):
        result.status = f"building pane {i + 1}: {spec}"
        if on_build is not None:
            on_build(i, spec)
        yield result  # a reconstruction or a merge can take a while: say which pane is being built
        try:
            variant = store.resolve(request.checkpoint, spec)
        except Exception as err:  # noqa: BLE001 (one pane's failure is that pane's message; the others still run)
            error = _pane_error(spec, err)
            result.panes[i].error = str(error)
            first_error = first_error or error
            yield result
            continue
        pane = result.panes[i]
        pane.label, pane.command, pane.note = variant.label, variant.command, variant.note
        built.append((i, variant))
        yield result
    if not built:
        raise first_error  # type: ignore[misc]  # every pane failed, so there is one
    return built


def _decode_panes(
    batch: VariantBatch, request: _Request, result: Comparison, built: list[tuple[int, Variant]]
) -> Generator[Comparison, None, tuple[DecodeState, list[TokenPieces]]]:
    """Decode the built variants together, streaming each pane's text (yielding after every token but the last)."""
    result.status = "generating"
    streams = [TokenPieces(request.pair.tokenizer) for _ in built]
    state = DecodeState(tokens=[])
    for state in decode(
        batch,
        request.input_ids,
        eos_token_ids=request.pair.eos_token_ids,
        score_own=True,  # the score matrix's diagonal, from the decoding logits
        **request.settings.decode_kwargs(),
    ):
        for (i, _), tokens, stream in zip(built, state.tokens, streams):
            stream.extend(tokens[len(stream.tokens) :])
            result.panes[i].tokens = list(tokens)
            result.panes[i].text = stream.text
        if not all(state.finished):
            yield result
    return state, streams


def _score(
    batch: VariantBatch,
    request: _Request,
    result: Comparison,
    built: list[tuple[int, Variant]],
    state: DecodeState,
    streams: list[TokenPieces],
) -> None:
    """Fill in the score matrix, each token's probability, the exact final texts and the first divergence."""
    texts = [result.panes[i].tokens for i, _ in built]
    # Each distinct text is scored once per model, and not at all under a model whose own text it is: decoding
    # already gave those scores (same tokens, same model), and greedy panes often agree.
    distinct: list[list[int]] = []
    which: list[int] = []  # pane a's text is distinct[which[a]]
    for tokens in texts:
        if tokens not in distinct:
            distinct.append(tokens)
        which.append(distinct.index(tokens))
    continuations = distinct + ([request.reference_ids] if request.reference_ids else [])
    own = {(a, which[a]) for a in range(len(texts))}
    nll, _ = score_continuations(batch, request.prompt_ids, continuations, skip=own)
    own_nll = state.own_nll or []  # decoded with score_own=True: one list per pane
    own_mean = [float(torch.tensor(t, dtype=torch.float64).mean()) for t in own_nll]
    result.scored = [i for i, _ in built]
    result.nll = [
        [own_mean[a] if which[b] == which[a] else float(nll[a, which[b]]) for b in range(len(texts))]
        for a in range(len(built))
    ]
    if request.reference_ids:
        result.reference_nll = [float(nll[a, len(distinct)]) for a in range(len(built))]
    for a, ((i, _), stream) in enumerate(zip(built, streams)):
        stream.finish()
        pane = result.panes[i]
        pane.text, pane.pieces = stream.text, stream.pieces
        pane.probs = [math.exp(-x) for x in own_nll[a]]
    result.divergence = first_divergence(texts)
    result.status = "done"
    result.done = True


def stream_comparison(
    store: VariantStore,
    prompt: str,
    variants: Sequence[VariantSpec | str],
    settings: GenerationSettings | None = None,
    *,
    checkpoint: str | None = None,
    reference: str | None = None,
    on_build: Callable[[int, VariantSpec], None] | None = None,
) -> Iterator[Comparison]:
    """Build the variants, decode them together, then score every text under every model.

    Arguments are checked before any work starts. A variant that cannot be built (no post-hoc snapshots, a
    `sigma_rel` outside the valid range, checkpoints that do not hold the same model...) gets its message in its
    pane and the other panes still run; when no variant can be built, the first error is raised.

    Args:
        store (`VariantStore`): Builds and runs the variants.
        prompt (`str`): The prompt.
        variants (`Sequence[VariantSpec | str]`): 1 to 4 variants (or their short forms, see `VariantSpec.parse`).
        settings (`GenerationSettings`, *optional*): Sampling settings (the defaults when not given).
        checkpoint (`str`, *optional*): The catalog label (default: the newest checkpoint).
        reference (`str`, *optional*): A text to score as a continuation of the prompt under every model.
        on_build (`Callable[[int, VariantSpec], None]`, *optional*): Called before each variant is built.

    Yields:
        `Comparison`: before and after building each variant, after every token (the last one with
        `status="scoring"`, while the scores are computed), and the scored final state (`done=True`).
    """
    request = _check_request(store, prompt, variants, settings, checkpoint, reference)
    result = Comparison(panes=[PaneResult(spec) for spec in request.specs])
    built = yield from _build_variants(store, request, result, on_build)
    batch = store.batch(request.checkpoint, [variant for _, variant in built])
    state, streams = yield from _decode_panes(batch, request, result, built)
    result.status = "scoring"
    yield result  # every pane's last token, while the scores are computed
    _score(batch, request, result, built, state, streams)
    yield result


def compare(
    store: VariantStore,
    prompt: str,
    variants: Sequence[VariantSpec | str],
    settings: GenerationSettings | None = None,
    **kwargs,
) -> Comparison:
    """[`stream_comparison`] run to the end: the final, scored [`Comparison`].

    Args:
        store (`VariantStore`): Builds and runs the variants.
        prompt (`str`): The prompt.
        variants (`Sequence[VariantSpec | str]`): 1 to 4 variants.
        settings (`GenerationSettings`, *optional*): Sampling settings.
        **kwargs: `checkpoint`, `reference`, `on_build` (see [`stream_comparison`]).
    """
    *_, last = stream_comparison(store, prompt, variants, settings, **kwargs)
    return last


def stream_pair(
    store: VariantStore,
    prompt: str,
    settings: GenerationSettings | None = None,
    *,
    checkpoint: str | None = None,
) -> Iterator[tuple[str, str]]:
    """The raw and the EMA continuation of `prompt` as they grow: [`stream_comparison`] with those two variants.

    Args:
        store (`VariantStore`): Builds and runs the variants.
        prompt (`str`): The prompt (the texts hold only the continuation).
        settings (`GenerationSettings`, *optional*): Sampling settings (the defaults when not given).
        checkpoint (`str`, *optional*): The catalog label (default: the newest checkpoint).

    Yields:
        `tuple[str, str]`: the raw and the EMA text after every token; the last pair is the exact final text.
    """
    for result in stream_comparison(store, prompt, ["raw", "ema"], settings, checkpoint=checkpoint):
        if result.status in ("generating", "done"):
            yield result.panes[0].text, result.panes[1].text


def generate_pair(
    store: VariantStore,
    prompt: str,
    settings: GenerationSettings | None = None,
    *,
    checkpoint: str | None = None,
) -> tuple[str, str]:
    """The raw and the EMA continuation of `prompt` with the same settings ([`stream_pair`] run to the end).

    Args:
        store (`VariantStore`): Builds and runs the variants.
        prompt (`str`): The prompt.
        settings (`GenerationSettings`, *optional*): Sampling settings.
        checkpoint (`str`, *optional*): The catalog label (default: the newest checkpoint).
    """
    *_, last = stream_pair(store, prompt, settings, checkpoint=checkpoint)
    return last

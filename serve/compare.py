"""One comparison request: up to four variants decoded together, then scored against each other.

Usable without Gradio. [`stream_comparison`] yields a [`Comparison`] after every token (texts only) and a last one
with the scores: the mean per-token negative log-likelihood of every pane's text under every pane's model, each
model's loss on an optional reference text, each token's probability under its own model, and the first token
where the panes differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hf_ema import ConfigError, ConfigTypeError, HfEmaError

from .batching import decode, score_continuations
from .generation import GenerationSettings, encode_prompt, validate_prompt
from .variants import MAX_PANES, Variant, VariantSpec, VariantStore

__all__ = [
    "Comparison",
    "PaneResult",
    "TokenPieces",
    "compare",
    "first_divergence",
    "stream_comparison",
    "token_pieces",
]


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


def _piece(text: str, previous: str) -> str:
    """What `text` adds to `previous` (the text before the token): the new tail when `text` extends `previous`; when
    decoding the longer list rewrote the end (a multi-byte character completed), the part past `previous`'s length."""
    common = 0
    while common < min(len(text), len(previous)) and text[common] == previous[common]:
        common += 1
    return text[common:] if common == len(previous) else text[len(previous) :]


def token_pieces(tokenizer, tokens: Sequence[int]) -> list[str]:
    """The text each token adds (they concatenate to `decode(tokens, skip_special_tokens=True)`); special tokens
    (end of sequence...) as their own name, so the token view shows them.

    Decodes the growing prefix at every token (quadratic, but right for any tokenizer); [`TokenPieces`] gives the
    same pieces as the tokens arrive, decoding only a short window at each.

    Args:
        tokenizer: The tokenizer.
        tokens (`Sequence[int]`): Token ids.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces, previous = [], ""
    for i, token in enumerate(tokens):
        if token in special:
            pieces.append(tokenizer.convert_ids_to_tokens(int(token)))
            continue
        # Decoding the growing prefix keeps word-start spaces right; a token that ends inside a multi-byte
        # character shows nothing until the token that completes it.
        text = tokenizer.decode(list(tokens[: i + 1]), skip_special_tokens=True)
        if text.endswith("\ufffd") and i < len(tokens) - 1:
            pieces.append("")
            continue
        pieces.append(_piece(text, previous))
        previous = text
    return pieces


class TokenPieces:
    """[`token_pieces`] and the decoded text of a token list that grows one token at a time, at a small cost per
    token: each new token decodes only the tokens since the text last ended on a whole character (at most about
    `window` of them), not the whole prefix.

    That split is exact for byte-level tokenizers (GPT-2, Llama 3, Qwen, the demo's): their text is the UTF-8
    decoding of the tokens' bytes, so a prefix that ends on a whole character decodes on its own. Tokenizers that
    decode a window differently from the same tokens in context (SentencePiece drops a word-start space at the
    start of a text; clean-up rules join across the split) can stream slightly different interim text;
    [`TokenPieces.finish`] checks the pieces against one decode of all the tokens and, on any difference, takes
    [`token_pieces`] instead, so the final pieces and text are always exact.

    Args:
        tokenizer: The tokenizer.
        window (`int`, *optional*, defaults to 16): Tokens after which the decoded window restarts (when it ends
            on a whole character).
    """

    def __init__(self, tokenizer, window: int = 16) -> None:
        self.tokenizer = tokenizer
        self.window = window
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.text = ""
        self._window: list[int] = []
        self._previous = ""  # the window's text up to the last token that got its piece

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens.

        Args:
            tokens (`Sequence[int]`): Token ids.
        """
        for token in tokens:
            token = int(token)
            self.tokens.append(token)
            if token in self.special:
                self.pieces.append(self.tokenizer.convert_ids_to_tokens(token))
                continue
            self._window.append(token)
            text = self.tokenizer.decode(self._window, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                self.pieces.append("")  # inside a multi-byte character: shown with the token that completes it
                continue
            piece = _piece(text, self._previous)
            self.pieces.append(piece)
            self.text += piece
            self._previous = text
            if len(self._window) >= self.window:
                self._window, self._previous = [], ""

    def finish(self) -> None:
        """Make `pieces` and `text` exactly [`token_pieces`] and `decode(tokens, skip_special_tokens=True)`."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.tokens and self.tokens[-1] not in self.special and self.pieces[-1] == "":
            # The text ends inside a multi-byte character: the last token shows the replacement character.
            self.pieces[-1] = _piece(self.tokenizer.decode(self._window, skip_special_tokens=True), self._previous)
        kept = "".join(p for p, t in zip(self.pieces, self.tokens) if t not in self.special)
        if kept != text:
            self.pieces = token_pieces(self.tokenizer, self.tokens)
        self.text = text


def first_divergence(token_lists: Sequence[Sequence[int]]) -> int | None:
    """The first position where the sequences differ (one ending before another counts), or `None` when they are
    equal or fewer than two.

    Args:
        token_lists (`Sequence[Sequence[int]]`): Token id sequences.
    """
    if len(token_lists) < 2:
        return None
    longest = max(len(t) for t in token_lists)
    for i in range(longest):
        column = {tuple(t[i : i + 1]) for t in token_lists}
        if len(column) > 1:
            return i
    return None


def _parse_specs(specs: Sequence[VariantSpec | str]) -> list[VariantSpec]:
    if isinstance(specs, (str, VariantSpec)) or not isinstance(specs, Sequence):
        raise ConfigTypeError(f"`variants` must be a list of variants, got {specs!r}")
    if not 1 <= len(specs) <= MAX_PANES:
        raise ConfigError(f"`variants` must hold 1 to {MAX_PANES} variants, got {len(specs)}")
    return [s if isinstance(s, VariantSpec) else VariantSpec.parse(s) for s in specs]


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
        `Comparison`: after each built variant, after every token, and the scored final state (`done=True`).
    """
    settings = GenerationSettings() if settings is None else settings
    if not isinstance(settings, GenerationSettings):
        raise ConfigTypeError(f"`settings` must be a GenerationSettings, got {type(settings).__name__}")
    prompt = validate_prompt(prompt)
    specs = _parse_specs(variants)
    if reference is not None and not isinstance(reference, str):
        raise ConfigTypeError(f"`reference` must be a string, got {type(reference).__name__}")
    pair = store.catalog.get(checkpoint)
    checkpoint = store.catalog.ref(checkpoint).label
    tokenizer = pair.tokenizer
    input_ids = encode_prompt(pair, prompt, settings)
    prompt_ids = input_ids[0].tolist()
    reference_ids: list[int] = []
    if reference is not None and reference.strip():
        reference_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
        limit = pair.context_length
        if not reference_ids:
            raise ConfigError(f"`reference` encodes to no tokens, got {reference!r}")
        if limit is not None and len(prompt_ids) + len(reference_ids) > limit:
            raise ConfigError(
                f"`reference` must fit in the model's context with the prompt ({limit} tokens); it is "
                f"{len(reference_ids)} tokens after a {len(prompt_ids)}-token prompt"
            )

    result = Comparison(panes=[PaneResult(spec) for spec in specs])
    built: list[tuple[int, Variant]] = []
    first_error: HfEmaError | None = None
    for i, spec in enumerate(specs):
        result.status = f"building pane {i + 1}: {spec}"
        if on_build is not None:
            on_build(i, spec)
        try:
            variant = store.resolve(checkpoint, spec)
        except HfEmaError as err:
            result.panes[i].error = str(err)
            first_error = first_error or err
            yield result
            continue
        pane = result.panes[i]
        pane.label, pane.command, pane.note = variant.label, variant.command, variant.note
        built.append((i, variant))
        yield result
    if not built:
        raise first_error

    batch = store.batch(checkpoint, [v for _, v in built])
    result.status = "generating"
    streams = [TokenPieces(tokenizer) for _ in built]
    for state in decode(
        batch,
        input_ids,
        eos_token_ids=pair.eos_token_ids,
        score_own=True,  # the score matrix's diagonal, from the decoding logits
        **settings.decode_kwargs(),
    ):
        for (i, _), tokens, stream in zip(built, state.tokens, streams):
            stream.extend(tokens[len(stream.tokens) :])
            result.panes[i].tokens = list(tokens)
            result.panes[i].text = stream.text
        if not all(state.finished):
            yield result

    result.status = "scoring"
    texts = [result.panes[i].tokens for i, _ in built]
    # Each distinct text is scored once per model, and not at all under a model whose own text it is: decoding
    # already gave those scores (same tokens, same model), and greedy panes often agree.
    distinct: list[list[int]] = []
    which: list[int] = []  # pane a's text is distinct[which[a]]
    for tokens in texts:
        if tokens not in distinct:
            distinct.append(tokens)
        which.append(distinct.index(tokens))
    continuations = distinct + ([reference_ids] if reference_ids else [])
    own = {(a, which[a]) for a in range(len(texts))}
    nll, _ = score_continuations(batch, prompt_ids, continuations, skip=own)
    own_mean = [float(torch.tensor(t, dtype=torch.float64).mean()) for t in state.own_nll]
    result.scored = [i for i, _ in built]
    result.nll = [
        [own_mean[a] if which[b] == which[a] else float(nll[a, which[b]]) for b in range(len(texts))]
        for a in range(len(built))
    ]
    if reference_ids:
        result.reference_nll = [float(nll[a, len(distinct)]) for a in range(len(built))]
    for a, ((i, _), stream) in enumerate(zip(built, streams)):
        stream.finish()
        pane = result.panes[i]
        pane.text, pane.pieces = stream.text, stream.pieces
        pane.probs = [math.exp(-x) for x in state.own_nll[a]]
    result.divergence = first_divergence(texts)
    result.status = "done"
    result.done = True
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

"""What the page's events and the API endpoints run, over one app's checkpoints and variants.

[`AppContext`] holds what every handler needs (the catalog, the variant store, the bounds a request is checked
against); [`AppHandlers`] holds the handlers themselves: the page's Generate button (streaming, each error shown where
it belongs, never as Gradio's red error badges), the checkpoint picker, and the two API endpoints `/compare` and
`/generate`, which take named parameters and return [`Comparison.to_dict`]'s structured result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from hf_ema import HfEmaError

from .compare import Comparison, compare, stream_comparison
from .generation import MAX_NEW_TOKENS_LIMIT, GenerationSettings, validate_prompt
from .loading import CheckpointCatalog
from .page import Page, loss_plot
from .render import ema_settings, scores_html
from .specs import VariantSpec
from .variants import VariantStore, snapshot_note

__all__ = ["DEFAULT_NEW_TOKENS", "AppContext", "AppHandlers", "error_line", "pane_fields"]

logger = logging.getLogger(__name__)

#: `max_new_tokens` when a request does not say, for a model whose context leaves room for it.
DEFAULT_NEW_TOKENS = 64


def error_line(message: str) -> str:
    """The one place a request's error is shown on the page (the status line under the Generate button)."""
    return f'<div class="hfema-error">⚠️ {message}</div>'


@dataclass
class AppContext:
    """What the handlers share: the checkpoints, the variants, and the bounds on `max_new_tokens`.

    Args:
        catalog (`CheckpointCatalog`): The checkpoints.
        store (`VariantStore`): Builds and runs their variants.
        max_new_tokens_limit (`int`): The largest `max_new_tokens` a request may ask for.
        default_new_tokens (`int`): `max_new_tokens` when a request does not say.
    """

    catalog: CheckpointCatalog
    store: VariantStore
    max_new_tokens_limit: int
    default_new_tokens: int

    @classmethod
    def create(
        cls, catalog: CheckpointCatalog, store: VariantStore, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT
    ) -> AppContext:
        """Bounds from the loaded model: at most `max_new_tokens_limit` new tokens, and one less than the model's
        context (the prompt needs a token at least); the default leaves half the context to the prompt.

        Args:
            catalog (`CheckpointCatalog`): The checkpoints (the newest is loaded here).
            store (`VariantStore`): Builds and runs their variants.
            max_new_tokens_limit (`int`, *optional*, defaults to `MAX_NEW_TOKENS_LIMIT`): The app's own bound.
        """
        GenerationSettings(max_new_tokens=1, max_new_tokens_limit=max_new_tokens_limit)  # validates the bound
        context = catalog.get().context_length
        limit, default = max_new_tokens_limit, min(DEFAULT_NEW_TOKENS, max_new_tokens_limit)
        if context is not None:
            limit = max(1, min(limit, context - 1))
            default = max(1, min(default, context // 2, limit))
        return cls(catalog, store, limit, default)

    def settings(
        self, max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, greedy: Any
    ) -> GenerationSettings:
        """A request's settings, checked against the app's bounds (`None` for `max_new_tokens`: the default)."""
        return GenerationSettings(
            max_new_tokens=self.default_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            greedy=greedy,
            max_new_tokens_limit=self.max_new_tokens_limit,
        )


class AppHandlers:
    """The handlers of one page: module-level code, bound to the app's context and the page's components.

    Args:
        context (`AppContext`): The checkpoints, the variants and the bounds.
        page (`Page`): The page's components (what the page handlers read and update).
    """

    def __init__(self, context: AppContext, page: Page) -> None:
        self.context = context
        self.page = page

    # --------------------------------------------------------------------------------------------------- the page
    def checkpoint_view(self, label: str) -> dict:
        """The header for another checkpoint: its EMA settings, its loss plot, its post-hoc snapshots."""
        page = self.page
        try:
            ref = self.context.catalog.ref(label)
            info = self.context.catalog.get(label).info
        except HfEmaError as err:
            return {page.status: error_line(str(err))}
        plot = loss_plot(ref)
        return {
            page.info: ema_settings(info, ref),
            page.plot: gr.update(value=plot, visible=plot is not None),
            page.posthoc_note: snapshot_note(ref),
            page.status: "",
        }

    def compare_on_page(self, values: dict) -> Iterator[dict]:
        """The Generate button: a bad setting is one message in the status line; a pane that cannot be built says
        why in its own header and the others still run; each pane shows its progress while it decodes."""
        page = self.page
        try:
            settings = self._settings_from(values)
            validate_prompt(values[page.prompt])
            self.context.catalog.ref(values[page.checkpoint])
        except HfEmaError as err:
            yield {page.status: error_line(str(err))}
            return
        specs: list[VariantSpec | None] = []
        errors: dict[int, str] = {}
        for pane in page.panes:
            try:
                specs.append(pane.spec(values))
            except HfEmaError as err:  # shown in that pane; the other panes still run
                specs.append(None)
                errors[pane.index] = str(err)
        if not any(specs):
            message = "turn on at least one pane (every pane is off)" if not errors else "no pane could be built"
            yield {**self._panes_view(None, specs, errors, 0), page.status: error_line(message)}
            return
        last = None
        try:
            for last in stream_comparison(
                self.context.store,
                values[page.prompt],
                [spec for spec in specs if spec is not None],
                settings,
                checkpoint=values[page.checkpoint],
                reference=values[page.reference] or None,
            ):
                yield self._panes_view(last, specs, errors, settings.max_new_tokens)
        except HfEmaError as err:
            if last is None:  # refused before any work (a prompt longer than the model's context...)
                yield {page.status: error_line(str(err))}
                return
            # No pane could be built: each pane already says why in its header.
            view = self._panes_view(last, specs, errors, settings.max_new_tokens)
            yield {**view, page.status: error_line("no pane could be built; each pane says why")}

    def _settings_from(self, values: dict) -> GenerationSettings:
        page = self.page
        greedy = bool(values[page.greedy])
        return self.context.settings(
            values[page.max_new_tokens], values[page.temperature], values[page.top_p], values[page.seed], greedy
        )

    def _panes_view(
        self, result: Comparison | None, specs: list[VariantSpec | None], errors: dict[int, str], max_new: int
    ) -> dict:
        """Every pane's outputs, the score matrix and the status line for the state `result` (`None`: no run)."""
        page = self.page
        slots = [i for i, spec in enumerate(specs) if spec is not None]
        by_pane = dict(zip(slots, result.panes)) if result is not None else {}
        done = result is not None and result.done
        decoding = result is not None and result.status in ("generating", "scoring")
        view: dict = {}
        for pane in page.panes:
            shown = by_pane.get(pane.index)
            if pane.index in errors:
                view.update(pane.show_error(errors[pane.index]))
            elif shown is None or result is None:
                view.update(pane.show(None))
            elif done:
                view.update(pane.show(shown, divergence=result.divergence, done=True))
            else:
                built = decoding or bool(shown.label)  # a built pane waits for the others at 0 tokens
                view.update(pane.show(shown, progress=(len(shown.tokens), max_new) if built else (0, 0)))
        view[page.scores] = scores_html(result) if done and result is not None else ""
        view[page.status] = "" if result is None or done else f"*{result.status}…*"
        return view

    # ----------------------------------------------------------------------------------------------- the API
    def compare(
        self,
        prompt: str,
        variants: list[str] | None = None,
        checkpoint: str | None = None,
        reference: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        greedy: bool = True,
    ) -> dict:
        """Up to four variants of a checkpoint decoded together from `prompt`, then every text scored under every
        variant's model.

        Args:
            prompt: The prompt.
            variants: Up to four short forms: raw, ema, posthoc:SIGMA_REL, merge:mean:K, merge:wsm:K, ema@CHECKPOINT
                (default: raw and ema).
            checkpoint: The checkpoint the variants are built for (default: the newest).
            reference: A text scored as a continuation of the prompt under every variant's model.
            max_new_tokens: Tokens to generate (default: the page's, from the model's context).
            temperature: Softmax temperature when sampling.
            top_p: Nucleus mass when sampling.
            seed: Seed of every variant's sampler.
            greedy: Take the most likely token (no sampling).

        Returns:
            texts, panes (variant, label, text, error, command, note, tokens, token_probs), scores (mean NLL of
            each text under each model), scored, reference_scores, divergence.
        """
        return self._run("compare", prompt, variants or ["raw", "ema"], checkpoint, reference,
                         max_new_tokens, temperature, top_p, seed, greedy)  # fmt: skip

    def generate(
        self,
        prompt: str,
        checkpoint: str | None = None,
        greedy: bool = True,
        max_new_tokens: int | None = None,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
    ) -> dict:
        """The raw and the EMA continuation of `prompt` (same settings and seed), decoded together and scored: `/compare`
        with the variants raw and ema and no reference text (the parameters mean what they mean there).

        Returns:
            The same structure as /compare: texts[0] is the raw text, texts[1] the EMA's.
        """
        return self._run("generate", prompt, ["raw", "ema"], checkpoint, "",
                         max_new_tokens, temperature, top_p, seed, greedy)  # fmt: skip

    def _run(self, name: str, prompt, variants, checkpoint, reference, *settings: Any) -> dict:
        try:
            result = compare(
                self.context.store,
                prompt,
                variants,
                self.context.settings(*settings),
                checkpoint=checkpoint or None,
                reference=reference or None,
            )
        except HfEmaError as err:
            # One log line and one error for the caller (no traceback); the server keeps serving.
            logger.warning("rejected a %s request: %s", name, err)
            raise gr.Error(str(err), print_exception=False) from None
        return result.to_dict()


def pane_fields(kind: str) -> tuple:
    """Which of a pane's fields its kind uses: sigma_rel (post-hoc), k and method (merge), the checkpoint (another
    checkpoint's EMA)."""
    return (
        gr.update(visible=kind == "posthoc"),
        gr.update(visible=kind == "merge"),
        gr.update(visible=kind == "merge"),
        gr.update(visible=kind == "checkpoint_ema"),
    )

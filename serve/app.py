"""The Gradio page: one prompt through up to four weight variants of a checkpoint, side by side, then scored.

Is the EMA better, where do the variants differ, and which EMA width should be published? Each pane shows one
variant (raw, EMA, a post-hoc EMA of any `sigma_rel`, a merge of the last checkpoints, another checkpoint's EMA):
its text, its tokens shaded by their probability under the pane's own model with the first divergence marked,
and the command that produces its weights. Under the panes, the score matrix.

[`build_demo`] only builds the `gr.Blocks`; it never launches it (see `serve.launch`). The page's parts are built in
`serve.page`, its events and API endpoints handled in `serve.handlers`; loading, building variants, batched decoding
and scoring live in `serve.loading`, `serve.variants`, `serve.batching` and `serve.compare`.
"""

from __future__ import annotations

import os

from hf_ema import ConfigError, ConfigTypeError

from .generation import MAX_NEW_TOKENS_LIMIT
from .loading import CheckpointCatalog
from .variants import VariantStore

__all__ = ["DEFAULT_CONCURRENCY", "build_demo"]

#: Requests served at the same time (the models run one decoding step at a time, so requests interleave token by
#: token rather than wait for each other to finish).
DEFAULT_CONCURRENCY = 8


def build_demo(
    catalog: CheckpointCatalog,
    *,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    concurrency: int = DEFAULT_CONCURRENCY,
    title: str = "hf-ema: raw vs EMA",
    store: VariantStore | None = None,
):
    """Build the page comparing a checkpoint's variants: raw, EMA, post-hoc EMA, merges, other checkpoints' EMAs.

    Up to four panes, each showing one variant's continuation of the prompt, its tokens shaded by their
    probability under the pane's own model with the first divergence marked, and the command that produces its
    weights; under them the score matrix (every pane's text under every pane's model, and a reference text). The
    variants decode together, one batched forward pass per token (`serve.batching`).

    Two API endpoints for `gradio_client`, with named parameters, each returning a structured result (texts,
    scores, divergence index; see `serve.compare.Comparison.to_dict`): `/compare` (`prompt`, `variants`,
    `checkpoint`, `reference`, `max_new_tokens`, `temperature`, `top_p`, `seed`, `greedy`) and `/generate`, the raw
    and the EMA continuation (the same without `variants` and `reference`). The queue serves `concurrency` requests
    at once. Style the page by passing `serve.page.page_style()` to `launch` (as `serve.launch.start_app` does).

    Args:
        catalog (`CheckpointCatalog`): The checkpoints to offer (the newest is selected first).
        max_new_tokens_limit (`int`, *optional*, defaults to `MAX_NEW_TOKENS_LIMIT`): Largest `max_new_tokens` a
            request may ask for (and at most one less than the model's context).
        concurrency (`int`, *optional*, defaults to 8): Requests generated at the same time.
        title (`str`, *optional*, defaults to `"hf-ema: raw vs EMA"`): Page title.
        store (`VariantStore`, *optional*): Builds the variants; a new one over `catalog` (with a temporary cache
            folder) when not given.

    Returns:
        `gr.Blocks`: the page, with its queue configured; call `.launch()` on it.
    """
    # Gradio phones home for analytics on import unless told not to; the app is meant to work offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .handlers import AppContext, AppHandlers, pane_fields
    from .page import build_page

    if not isinstance(catalog, CheckpointCatalog):
        raise ConfigTypeError(f"`catalog` must be a CheckpointCatalog, got {type(catalog).__name__}")
    store = VariantStore(catalog) if store is None else store
    if not isinstance(store, VariantStore) or store.catalog is not catalog:
        raise ConfigError("`store` must be a VariantStore over the same `catalog`")
    # Loaded here, outside any handler, so a broken checkpoint fails at start-up with a CheckpointError.
    context = AppContext.create(catalog, store, max_new_tokens_limit)

    with gr.Blocks(title=title) as demo:
        page = build_page(context, title)
        handlers = AppHandlers(context, page)
        for event in (page.button.click, page.prompt.submit):
            # Errors are shown in the page (the status line, a pane's header), so Gradio's progress overlay and
            # its error badges stay off; each pane shows its own progress.
            event(
                handlers.compare_on_page,
                inputs=page.request_inputs,
                outputs=page.request_outputs,
                show_progress="hidden",
                api_visibility="private",
            )
        status_outputs = [page.info, page.plot, page.posthoc_note, page.status]
        page.checkpoint.change(
            handlers.checkpoint_view, inputs=[page.checkpoint], outputs=status_outputs, api_visibility="private"
        )
        for pane in page.panes:
            pane.kind.change(pane_fields, inputs=[pane.kind], outputs=pane.inputs[1:], api_visibility="private")
        gr.api(handlers.compare, api_name="compare")
        gr.api(handlers.generate, api_name="generate")

    demo.queue(default_concurrency_limit=concurrency, max_size=max(64, 4 * concurrency))
    return demo

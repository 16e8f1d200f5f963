"""The Gradio page: one prompt through up to four weight variants of a checkpoint, side by side, then scored.

Is the EMA better, where do the variants differ, and which EMA width should be published? Each pane shows one
variant (raw, EMA, a post-hoc EMA of any `sigma_rel`, a merge of the last checkpoints, another checkpoint's EMA):
its text, its tokens shaded by their probability under the pane's own model with the first divergence marked,
and the command that produces its weights. Under the panes, the score matrix.

[`build_demo`] only builds the `gr.Blocks`; it never launches it (see `serve.launch`). Loading, building variants,
batched decoding and scoring live in `serve.loading`, `serve.variants`, `serve.batching` and `serve.compare`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hf_ema import CheckpointError, ConfigError, ConfigTypeError, HfEmaError

from .compare import Comparison, generate_pair, stream_comparison
from .generation import MAX_NEW_TOKENS_LIMIT, GenerationSettings, validate_prompt
from .loading import CheckpointCatalog, CheckpointRef
from .render import pane_header, scores_html, token_view_html
from .variants import KINDS, VariantSpec, VariantStore, run_folder, snapshot_note, snapshot_steps

__all__ = ["DEFAULT_CONCURRENCY", "build_demo", "describe_ema", "loss_plot"]

logger = logging.getLogger(__name__)

#: The pane kind that shows nothing.
OFF = "off"

#: Requests served at the same time (the models run one decoding step at a time under a lock, so requests
#: interleave token by token rather than wait for each other to finish).
DEFAULT_CONCURRENCY = 8


def describe_ema(info: dict[str, Any], ref: CheckpointRef) -> str:
    """Markdown describing a checkpoint's EMA: step, last decay and the non-default parts of its config.

    Args:
        info (`dict`): The EMA's `ema_state.json`.
        ref (`CheckpointRef`): The checkpoint.
    """
    where = ref.location if ref.is_local else f"{ref.location} (Hub)"
    if not info:
        return f"**Checkpoint** `{ref.label}` — `{where}`\n\nNo `ema_state.json` found: EMA step and config unknown."
    decay = info.get("decay")
    decay_text = f"{decay:.6g}" if isinstance(decay, (int, float)) else "n/a"
    lines = [
        f"**Checkpoint** `{ref.label}` — `{where}`",
        "",
        f"**EMA step** {info.get('step', 'n/a')} · **updates** {info.get('num_updates', 'n/a')} · "
        f"**last decay** {decay_text}",
    ]
    config = info.get("config") or {}
    if config:
        shown = ", ".join(f"`{k}={v!r}`" for k, v in config.items() if v is not None and k not in ("device",))
        lines += ["", f"**EMA config** {shown}"]
    return "\n".join(lines)


def loss_plot(ref: CheckpointRef, out_dir: str | os.PathLike) -> Path | None:
    """PNG of the run's raw and EMA eval loss up to `ref` (from its `trainer_state.json`), or `None` without one.

    Args:
        ref (`CheckpointRef`): The checkpoint (a `checkpoint-N` folder plots its own history, a run folder its
            newest checkpoint's).
        out_dir (`str` or `os.PathLike`): Where to write the PNG (never into the checkpoint itself).
    """
    if not ref.is_local:
        return None
    from hf_ema import plot_run

    try:
        return plot_run(ref.location, Path(out_dir) / f"{ref.label}.png")
    except CheckpointError:  # no trainer_state.json, or nothing logged: the page shows no plot
        return None


def _quiet_blocks(gr):
    """`gr.Blocks` that logs one line, instead of a traceback, for a request Gradio's own input checks reject."""

    class QuietBlocks(gr.Blocks):
        async def process_api(self, block_fn, *args, **kwargs):
            try:
                return await super().process_api(block_fn, *args, **kwargs)
            except gr.Error as err:
                # Gradio's component checks (a value outside a dropdown's choices or a slider's range) raise
                # gr.Error with print_exception=True, and the queue prints a traceback for each. Our own handlers
                # raise with print_exception=False, so only those are turned into one log line here.
                if err.print_exception:
                    err.print_exception = False
                    name = getattr(block_fn, "api_name", None) or "request"
                    logger.warning("rejected a %s request: %s", name, err.message)
                raise

    return QuietBlocks


def _default_panes(catalog: CheckpointCatalog) -> list[dict[str, Any]]:
    """Raw, EMA, then a post-hoc EMA when the run has snapshots and a merge when it has several checkpoints."""
    ref = catalog.ref()
    run = run_folder(ref)
    n_checkpoints = sum(1 for r in catalog.refs if r.label.startswith("checkpoint-"))
    panes = [{"kind": "raw"}, {"kind": "ema"}, {"kind": OFF}, {"kind": OFF}]
    if snapshot_steps(run):
        panes[2] = {"kind": "posthoc"}
    if run is not None and n_checkpoints >= 2:
        panes[3] = {"kind": "merge", "k": min(3, n_checkpoints)}
    return panes


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

    Two API endpoints for `gradio_client`: `/compare` (what the page's button runs) and `/generate`, the raw and
    EMA continuations only, with inputs `(checkpoint, prompt, max_new_tokens, temperature, top_p, seed, greedy)`
    and outputs `(raw, ema)`. The queue serves `concurrency` requests at once.

    Args:
        catalog (`CheckpointCatalog`): The checkpoints to offer (the newest is selected first).
        max_new_tokens_limit (`int`, *optional*, defaults to `MAX_NEW_TOKENS_LIMIT`): Largest `max_new_tokens` a
            request may ask for.
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

    if not isinstance(catalog, CheckpointCatalog):
        raise ConfigTypeError(f"`catalog` must be a CheckpointCatalog, got {type(catalog).__name__}")
    GenerationSettings(max_new_tokens_limit=max_new_tokens_limit)  # validates the bound itself
    store = VariantStore(catalog) if store is None else store
    if not isinstance(store, VariantStore) or store.catalog is not catalog:
        raise ConfigError("`store` must be a VariantStore over the same `catalog`")

    # The plots are written here, not into the (possibly read-only) checkpoint folders.
    plot_dir = tempfile.mkdtemp(prefix="hf_ema_serve_")

    def checkpoint_view(label: str):
        try:
            ref = catalog.ref(label)
            pair = catalog.get(label)
        except HfEmaError as err:
            raise gr.Error(str(err), print_exception=False) from None
        png = loss_plot(ref, plot_dir)
        return (
            describe_ema(pair.info, ref),
            gr.Image(value=str(png) if png else None, visible=png is not None),
            snapshot_note(ref),
        )

    def settings_from(max_new_tokens, temperature, top_p, seed, greedy) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            greedy=bool(greedy),
            max_new_tokens_limit=max_new_tokens_limit,
        )

    def generate(
        checkpoint: str | None = None,
        prompt: str = "",
        max_new_tokens: float = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: float = 0,
        greedy: bool = False,
    ) -> tuple[str, str]:
        """The raw and the EMA continuation of `prompt` (same settings and seed), generated together."""
        try:
            settings = settings_from(max_new_tokens, temperature, top_p, seed, greedy)
            return generate_pair(store, prompt, settings, checkpoint=checkpoint or None)
        except HfEmaError as err:
            # Shown to the caller as an error; the server keeps serving.
            raise gr.Error(str(err), print_exception=False) from None

    default = catalog.default_label
    # Loaded here, outside any handler, so a broken checkpoint fails at start-up with a CheckpointError.
    default_info = describe_ema(catalog.get(default).info, catalog.ref(default))
    default_png = loss_plot(catalog.ref(default), plot_dir)
    pane_defaults = _default_panes(catalog)
    kind_choices = [(label, key) for key, label in KINDS.items()] + [("off", OFF)]

    with _quiet_blocks(gr)(title=title) as demo:
        gr.Markdown(
            f"# {title}\nThe same prompt, seed and settings through up to four weight variants of a checkpoint "
            "(raw, EMA, a post-hoc EMA of any width, a merge of the last checkpoints, another checkpoint's EMA), "
            "decoded together; then every text scored under every model."
        )
        with gr.Row():
            checkpoint = gr.Dropdown(
                choices=catalog.labels,
                value=default,
                label="checkpoint",
                interactive=len(catalog.labels) > 1,
                scale=1,
            )
            info = gr.Markdown(default_info, elem_id="ema-info")
        plot = gr.Image(
            value=str(default_png) if default_png else None,
            label="eval loss: raw vs EMA (trainer_state.json)",
            type="filepath",
            interactive=False,
            height=300,
            visible=default_png is not None,
            elem_id="loss-plot",
        )
        prompt = gr.Textbox(label="prompt", lines=3, placeholder="Type the start of a text…", elem_id="prompt")
        reference = gr.Textbox(
            label="reference text (optional): scored as a continuation of the prompt under every pane's model",
            lines=2,
            elem_id="reference",
        )
        with gr.Row():
            max_new_tokens = gr.Number(
                value=min(64, max_new_tokens_limit),
                label=f"max new tokens (1–{max_new_tokens_limit})",
                precision=None,
                elem_id="max-new-tokens",
            )
            temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
            seed = gr.Number(value=0, label="seed (0–4294967295)", precision=None, elem_id="seed")
            # Greedy by default: then the first divergence is a real difference between the weights.
            greedy = gr.Checkbox(value=True, label="greedy (no sampling)", elem_id="greedy")
        posthoc_info = gr.Markdown(snapshot_note(catalog.ref(default)), elem_id="posthoc-note")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")

        pane_inputs, pane_outputs = [], []
        with gr.Row(equal_height=False):
            for i, pane_default in enumerate(pane_defaults):
                kind_value = pane_default["kind"]
                with gr.Column(min_width=240, elem_id=f"pane-{i + 1}"):
                    kind = gr.Dropdown(
                        choices=kind_choices, value=kind_value, label=f"pane {i + 1}", elem_id=f"pane-{i + 1}-kind"
                    )
                    sigma_rel = gr.Number(
                        value=0.15,
                        label="sigma_rel (post-hoc EMA width, e.g. 0.05–0.25)",
                        precision=None,
                        visible=kind_value == "posthoc",
                        elem_id=f"pane-{i + 1}-sigma",
                    )
                    with gr.Row():
                        k = gr.Number(
                            value=pane_default.get("k", 3),
                            label="k (newest checkpoints)",
                            precision=0,
                            visible=kind_value == "merge",
                            elem_id=f"pane-{i + 1}-k",
                        )
                        method = gr.Dropdown(
                            choices=[("mean", "mean"), ("WSM (1-sqrt)", "wsm")],
                            value="mean",
                            label="merge",
                            visible=kind_value == "merge",
                            elem_id=f"pane-{i + 1}-method",
                        )
                    other = gr.Dropdown(
                        choices=catalog.labels,
                        value=catalog.labels[0],
                        label="whose EMA",
                        visible=kind_value == "checkpoint_ema",
                        elem_id=f"pane-{i + 1}-checkpoint",
                    )
                    first_header = (
                        pane_header(i, None) if kind_value == OFF else f"**pane {i + 1}** · {KINDS[kind_value]}"
                    )
                    header = gr.Markdown(first_header, elem_id=f"pane-{i + 1}-header")
                    text = gr.Textbox(label="text", lines=6, interactive=False, elem_id=f"pane-{i + 1}-output")
                    tokens = gr.HTML("", elem_id=f"pane-{i + 1}-tokens")
                    command = gr.Code(
                        value="",
                        language="shell",
                        label="command for these weights",
                        interactive=False,
                        wrap_lines=True,
                        show_line_numbers=False,
                        elem_id=f"pane-{i + 1}-command",
                    )
                kind.change(
                    lambda value: (
                        gr.update(visible=value == "posthoc"),
                        gr.update(visible=value == "merge"),
                        gr.update(visible=value == "merge"),
                        gr.update(visible=value == "checkpoint_ema"),
                    ),
                    inputs=[kind],
                    outputs=[sigma_rel, k, method, other],
                    api_name=False,
                )
                pane_inputs += [kind, sigma_rel, k, method, other]
                pane_outputs.append((header, text, tokens, command))
        scores = gr.HTML("", elem_id="scores")

        flat_outputs = [c for group in pane_outputs for c in group] + [scores, status]

        def render(result: Comparison | None, specs: list, errors: dict[int, str]) -> list:
            # `specs[i]` is pane i's VariantSpec (None when off or invalid); `result.panes` follow the non-None ones.
            slots = [i for i, spec in enumerate(specs) if spec is not None]
            by_pane = dict(zip(slots, result.panes)) if result is not None else {}
            done = result is not None and result.done
            values: list[Any] = []
            for i in range(len(pane_outputs)):
                pane = by_pane.get(i)
                if i in errors:
                    values += [f"**pane {i + 1}**\n\n⚠️ {errors[i]}", "", token_view_html(i, None, None), ""]
                elif pane is None:
                    values += [pane_header(i, None), "", token_view_html(i, None, None), ""]
                else:
                    view = token_view_html(i, pane, result.divergence) if done else ""
                    values += [pane_header(i, pane), pane.text, view, pane.command]
            values.append(scores_html(result) if done else "")
            values.append("" if result is None or done else f"*{result.status}…*")
            return values

        def compare_panes(
            ckpt,
            prompt_text,
            reference_text,
            max_new,
            temp,
            topp,
            seed_value,
            greedy_value,
            *panes,
            progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's way of asking for a progress bar)
        ):
            try:
                settings = settings_from(max_new, temp, topp, seed_value, greedy_value)
                validate_prompt(prompt_text)
                catalog.ref(ckpt)
            except HfEmaError as err:
                raise gr.Error(str(err), print_exception=False) from None
            specs: list[VariantSpec | None] = []
            errors: dict[int, str] = {}
            for i in range(len(pane_outputs)):
                kind_value, sigma_value, k_value, method_value, other_value = panes[5 * i : 5 * i + 5]
                if kind_value == OFF:
                    specs.append(None)
                    continue
                try:
                    specs.append(
                        VariantSpec(
                            kind_value,
                            sigma_rel=sigma_value if kind_value == "posthoc" else None,
                            k=k_value if kind_value == "merge" else None,
                            method=method_value if kind_value == "merge" else None,
                            checkpoint=other_value if kind_value == "checkpoint_ema" else None,
                        )
                    )
                except HfEmaError as err:  # shown in that pane; the other panes still run
                    specs.append(None)
                    errors[i] = str(err)
            wanted = [s for s in specs if s is not None]
            if not wanted:
                if errors:
                    yield render(None, specs, errors)
                    return
                raise gr.Error("turn on at least one pane (every pane is off)", print_exception=False)

            def on_build(index: int, spec: VariantSpec) -> None:
                progress(None, desc=f"building {spec}")

            last = None
            try:
                for last in stream_comparison(
                    store,
                    prompt_text,
                    wanted,
                    settings,
                    checkpoint=ckpt,
                    reference=reference_text or None,
                    on_build=on_build,
                ):
                    yield render(last, specs, errors)
            except HfEmaError as err:
                if last is not None and all(pane.error for pane in last.panes):
                    # No pane could be built: each pane already shows why.
                    yield render(last, specs, errors)
                    return
                raise gr.Error(str(err), print_exception=False) from None

        inputs = [checkpoint, prompt, reference, max_new_tokens, temperature, top_p, seed, greedy, *pane_inputs]
        button.click(compare_panes, inputs=inputs, outputs=flat_outputs, api_name="compare")
        prompt.submit(compare_panes, inputs=inputs, outputs=flat_outputs, api_name=False)
        checkpoint.change(checkpoint_view, inputs=[checkpoint], outputs=[info, plot, posthoc_info], api_name=False)
        gr.api(generate, api_name="generate")

    demo.queue(default_concurrency_limit=concurrency, max_size=max(64, 4 * concurrency))
    return demo

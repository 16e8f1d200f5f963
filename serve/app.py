"""The Gradio page: one prompt, the raw and the EMA model's continuations side by side.

[`build_demo`] only builds the `gr.Blocks`; it never launches it (see `serve.launch`). Model loading and
generation live in `serve.loading` and `serve.generation`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hf_ema.errors import CheckpointError, HfEmaError

from .generation import MAX_NEW_TOKENS_LIMIT, GenerationSettings, stream_pair
from .loading import CheckpointCatalog, CheckpointRef

__all__ = ["DEFAULT_CONCURRENCY", "build_demo", "describe_ema", "loss_plot"]

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
    from hf_ema.tools.plotting import plot_run

    try:
        return plot_run(ref.location, Path(out_dir) / f"{ref.label}.png")
    except CheckpointError:  # no trainer_state.json, or nothing logged: the page shows no plot
        return None


def build_demo(
    catalog: CheckpointCatalog,
    *,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    concurrency: int = DEFAULT_CONCURRENCY,
    title: str = "hf-ema: raw vs EMA",
):
    """Build the page comparing a checkpoint's raw and EMA generations.

    The generate event is exposed to `gradio_client` as `/generate` with inputs `(checkpoint, prompt,
    max_new_tokens, temperature, top_p, seed, greedy)` and outputs `(raw, ema)`; the queue serves `concurrency`
    requests at once.

    Args:
        catalog (`CheckpointCatalog`): The checkpoints to offer (the newest is selected first).
        max_new_tokens_limit (`int`, *optional*, defaults to `MAX_NEW_TOKENS_LIMIT`): Largest `max_new_tokens` a
            request may ask for.
        concurrency (`int`, *optional*, defaults to 8): Requests generated at the same time.
        title (`str`, *optional*, defaults to `"hf-ema: raw vs EMA"`): Page title.

    Returns:
        `gr.Blocks`: the page, with its queue configured; call `.launch()` on it.
    """
    # Gradio phones home for analytics on import unless told not to; the app is meant to work offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    if not isinstance(catalog, CheckpointCatalog):
        from hf_ema.errors import ConfigTypeError

        raise ConfigTypeError(f"`catalog` must be a CheckpointCatalog, got {type(catalog).__name__}")
    GenerationSettings(max_new_tokens_limit=max_new_tokens_limit)  # validates the bound itself

    # The plots are written here, not into the (possibly read-only) checkpoint folders.
    plot_dir = tempfile.mkdtemp(prefix="hf_ema_serve_")

    def checkpoint_view(label: str):
        try:
            ref = catalog.ref(label)
            pair = catalog.get(label)
        except HfEmaError as err:
            raise gr.Error(str(err), print_exception=False) from None
        png = loss_plot(ref, plot_dir)
        return describe_ema(pair.info, ref), gr.Image(value=str(png) if png else None, visible=png is not None)

    def generate(checkpoint, prompt, max_new_tokens, temperature, top_p, seed, greedy):
        try:
            settings = GenerationSettings(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                greedy=bool(greedy),
                max_new_tokens_limit=max_new_tokens_limit,
            )
            pair = catalog.get(checkpoint)
            yield from stream_pair(pair, prompt, settings)
        except HfEmaError as err:
            # Shown in the page as an error toast; the server keeps serving.
            raise gr.Error(str(err), print_exception=False) from None

    default = catalog.default_label
    # Loaded here, outside any handler, so a broken checkpoint fails at start-up with a CheckpointError.
    default_info = describe_ema(catalog.get(default).info, catalog.ref(default))
    default_png = loss_plot(catalog.ref(default), plot_dir)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nThe same prompt, seed and settings through the raw weights and their EMA.")
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
            greedy = gr.Checkbox(value=False, label="greedy (no sampling)", elem_id="greedy")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            raw_out = gr.Textbox(label="raw", lines=8, interactive=False, elem_id="raw-output")
            ema_out = gr.Textbox(label="EMA", lines=8, interactive=False, elem_id="ema-output")

        inputs = [checkpoint, prompt, max_new_tokens, temperature, top_p, seed, greedy]
        button.click(generate, inputs=inputs, outputs=[raw_out, ema_out], api_name="generate")
        prompt.submit(generate, inputs=inputs, outputs=[raw_out, ema_out], api_name=False)
        checkpoint.change(checkpoint_view, inputs=[checkpoint], outputs=[info, plot], api_name=False)

    demo.queue(default_concurrency_limit=concurrency, max_size=max(64, 4 * concurrency))
    return demo

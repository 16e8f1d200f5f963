"""The page's components, one builder per part: the header (checkpoint, EMA settings, loss plot), the request (prompt,
reference, settings), the panes ([`PaneControls`], one per variant shown) and the results (status line, scores).

[`Page`] holds them all, so the handlers (`serve.handlers`) read a request's values and write their updates by
component, never by position. [`page_style`] is the page's theme and CSS, passed to `launch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from hf_ema import CheckpointError

from .compare import PaneResult
from .loading import CheckpointRef
from .render import ema_settings, pane_header, token_view_html
from .specs import KINDS, VariantSpec
from .variants import is_bema, run_folder, snapshot_note, snapshot_steps

if TYPE_CHECKING:
    import pandas as pd

    from .handlers import AppContext
    from .loading import CheckpointCatalog

__all__ = ["OFF", "Page", "PaneControls", "build_page", "loss_plot", "page_style"]

#: The pane kind that shows nothing.
OFF = "off"

#: The page's own styles: compact token views, output boxes that fit their text, one error line.
CSS = """
.hfema-tokens { white-space: pre-wrap; overflow-wrap: anywhere; font-family: monospace; line-height: 1.6;
  max-height: 16em; overflow-y: auto; }
.hfema-tokens .tok { border-radius: 3px; padding: 0 1px; }
.hfema-tokens .tok.diverge { outline: 2px solid #c00000; outline-offset: 1px; }
.hfema-tokens .diverge-marker { color: #c00000; font-weight: bold; }
.hfema-error { color: #b00020; font-weight: 600; }
#ema-info table { font-size: 0.9em; margin-top: 0.3em; }
#ema-info th, #ema-info td { white-space: nowrap; }
#posthoc-note code, #ema-info code, [id$="-header"] code { white-space: normal; overflow-wrap: anywhere; }
.hfema-scores { font-size: 0.9em; }
.hfema-caption { font-size: 0.9em; margin: 0 0 0.3em 0; }
.hfema-scores th, .hfema-scores td { padding: 3px 8px; }
"""


def page_style() -> dict[str, Any]:
    """The `launch` arguments that style the page: the theme and [`CSS`].

    Gradio's default theme declares its font's weights 400 and 600, and its 600 file holds only a few glyphs ("A",
    "B" and some Cyrillic), so bold text mixes that font's "A" with a fallback font's other letters: "EMA" reads as
    "EM" and a small capital "A". The theme here declares the complete regular and bold files instead.
    """
    fonts = gr.themes.LocalFont("Source Sans Pro", weights=(400, 700))
    mono = gr.themes.LocalFont("IBM Plex Mono", weights=(400, 700))
    theme = gr.themes.Default(
        font=[fonts, "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=[mono, "ui-monospace", "Consolas", "monospace"],
    )
    return {"theme": theme, "css": CSS}


def loss_plot(ref: CheckpointRef) -> pd.DataFrame | None:
    """The run's logged losses up to `ref` (from its `trainer_state.json`, as `hf-ema plot` reads them), as the rows
    Gradio's `LinePlot` draws, one per curve of `RunHistory.loss_curves` (each raw `eval_*_loss` and its EMA twin,
    or the eval or training loss alone where the run logged no pair). Drawn by the browser, so the app needs no
    plotting library.

    Args:
        ref (`CheckpointRef`): The checkpoint (a `checkpoint-N` folder plots its own history, a run folder its
            newest checkpoint's).

    Returns:
        `pandas.DataFrame` with columns `step`, `loss` and `curve`, or `None` when there is nothing to plot.
    """
    if not ref.is_local:
        return None
    import pandas as pd

    from hf_ema import load_history

    try:
        history = load_history(ref.location)
    except CheckpointError:  # no trainer_state.json: the page shows no plot
        return None
    rows = [(step, value, name) for name, s in history.loss_curves() for step, value in zip(s.steps, s.values)]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]) if rows else None


@dataclass
class PaneControls:
    """One pane: what it asks for (its kind and that kind's fields) and what it shows.

    Args:
        index (`int`): Its position (0-based).
        kind, sigma_rel, k, method, other: Its inputs: the variant kind, the post-hoc width, the merge's `k` and
            method, the checkpoint whose EMA to show.
        header, text, tokens, command: Its outputs: title (or reason or progress), text, token view, command.
    """

    index: int
    kind: Any
    sigma_rel: Any
    k: Any
    method: Any
    other: Any
    header: Any
    text: Any
    tokens: Any
    command: Any

    @property
    def inputs(self) -> list:
        return [self.kind, self.sigma_rel, self.k, self.method, self.other]

    @property
    def outputs(self) -> list:
        return [self.header, self.text, self.tokens, self.command]

    def spec(self, values: dict) -> VariantSpec | None:
        """The variant this pane asks for in a request's `values` (by component), `None` when it is off.

        Raises:
            `ConfigError`: with one line when its fields do not make a variant.
        """
        kind = values[self.kind]
        if kind == OFF:
            return None
        return VariantSpec(
            kind,
            sigma_rel=values[self.sigma_rel] if kind == "posthoc" else None,
            k=values[self.k] if kind == "merge" else None,
            method=values[self.method] if kind == "merge" else None,
            checkpoint=values[self.other] if kind == "checkpoint_ema" else None,
        )

    def show(
        self,
        pane: PaneResult | None,
        *,
        divergence: int | None = None,
        done: bool = False,
        progress: tuple[int, int] | None = None,
    ) -> dict:
        """Its outputs for `pane` (`None`: off): the text as it streams with the progress in the header, then the
        token view and the command once `done`."""
        if pane is None:
            return {self.header: pane_header(self.index, None), **self._empty()}
        if pane.error:
            return {self.header: pane_header(self.index, pane), **self._empty()}
        return {
            self.header: pane_header(self.index, pane, None if done else progress),
            self.text: gr.update(value=pane.text, visible=True),
            self.tokens: token_view_html(self.index, pane, divergence) if done else "",
            self.command: gr.update(value=pane.command if done else "", visible=done),
        }

    def show_error(self, message: str) -> dict:
        """Its outputs when its own fields are wrong: the one-line reason in its header, nothing else."""
        return {self.header: f"**pane {self.index + 1}**\n\n⚠️ {message}", **self._empty()}

    def _empty(self) -> dict:
        # A pane with nothing to show hides its boxes (an empty box, a code box above all, takes room).
        return {
            self.text: gr.update(value="", visible=False),
            self.tokens: "",
            self.command: gr.update(value="", visible=False),
        }


@dataclass
class Page:
    """Every component the handlers read or write."""

    checkpoint: Any
    info: Any
    plot: Any
    posthoc_note: Any
    prompt: Any
    reference: Any
    max_new_tokens: Any
    temperature: Any
    top_p: Any
    seed: Any
    greedy: Any
    button: Any
    status: Any
    scores: Any
    panes: list[PaneControls]

    @property
    def request_inputs(self) -> set:
        """What a request reads (handlers get them as one dict keyed by component)."""
        settings = {self.max_new_tokens, self.temperature, self.top_p, self.seed, self.greedy}
        return {self.checkpoint, self.prompt, self.reference, *settings, *(c for p in self.panes for c in p.inputs)}

    @property
    def request_outputs(self) -> list:
        """What a request writes: every pane's outputs, the scores and the status line."""
        return [c for p in self.panes for c in p.outputs] + [self.scores, self.status]


def _default_panes(catalog: CheckpointCatalog) -> list[dict[str, Any]]:
    """Raw, EMA, then BEMA's plain EMA for a BEMA run, else a post-hoc EMA when the run has snapshots; a merge when it
    has several checkpoints."""
    ref = catalog.ref()
    run = run_folder(ref)
    n_checkpoints = sum(1 for r in catalog.refs if r.label.startswith("checkpoint-"))
    panes = [{"kind": "raw"}, {"kind": "ema"}, {"kind": OFF}, {"kind": OFF}]
    if is_bema(ref):
        panes[2] = {"kind": "ema_plain"}
    elif snapshot_steps(run):
        panes[2] = {"kind": "posthoc"}
    if run is not None and n_checkpoints >= 2:
        panes[3] = {"kind": "merge", "k": min(3, n_checkpoints)}
    return panes


def build_header(context: AppContext, title: str) -> dict[str, Any]:
    """The title, the checkpoint picker with its EMA's settings and post-hoc snapshots, and the loss plot."""
    catalog = context.catalog
    default = catalog.default_label
    ref = catalog.ref(default)
    plot = loss_plot(ref)
    gr.Markdown(
        f"# {title}\nOne prompt through up to four weight variants of a checkpoint (raw, EMA, a post-hoc EMA of any "
        "width, a merge of the last checkpoints, another checkpoint's EMA), decoded together, then scored.",
        elem_id="title",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row(equal_height=False):
                checkpoint = gr.Dropdown(
                    choices=catalog.labels,
                    value=default,
                    label="checkpoint",
                    interactive=len(catalog.labels) > 1,
                    scale=1,
                    min_width=160,
                )
                posthoc_note = gr.Markdown(snapshot_note(ref), elem_id="posthoc-note")
            info = gr.Markdown(ema_settings(catalog.get(default).info, ref), elem_id="ema-info")
        plot_box = gr.LinePlot(
            value=plot,
            x="step",
            y="loss",
            color="curve",
            title="eval loss: raw vs EMA (trainer_state.json)",
            x_title="optimizer step",
            show_label=False,
            height=260,
            scale=2,
            visible=plot is not None,
            elem_id="loss-plot",
        )
    return {"checkpoint": checkpoint, "info": info, "plot": plot_box, "posthoc_note": posthoc_note}


def build_request(context: AppContext) -> dict[str, Any]:
    """The prompt, the reference text and the settings (their bounds from the loaded model), and the button."""
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(
            label="prompt", lines=2, placeholder="Type the start of a text…", scale=3, elem_id="prompt"
        )
        reference = gr.Textbox(
            label="reference text (optional), scored under every pane's model",
            lines=2,
            scale=2,
            elem_id="reference",
        )
    with gr.Row(equal_height=True):
        max_new_tokens = gr.Number(
            value=context.default_new_tokens,
            label=f"max new tokens (1–{context.max_new_tokens_limit})",
            precision=None,
            min_width=140,
            elem_id="max-new-tokens",
        )
        temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="temperature")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
        seed = gr.Number(value=0, label="seed (0–4294967295)", precision=None, min_width=140, elem_id="seed")
        with gr.Column(min_width=160):
            # Greedy by default: then the first divergence is a real difference between the weights.
            greedy = gr.Checkbox(value=True, label="greedy (no sampling)", elem_id="greedy")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
    status = gr.Markdown("", elem_id="status")
    return {
        "prompt": prompt,
        "reference": reference,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "greedy": greedy,
        "button": button,
        "status": status,
    }


def build_pane(catalog: CheckpointCatalog, index: int, default: dict[str, Any]) -> PaneControls:
    """One pane: its kind and fields, then its header, text, token view and command."""
    kind_value = default["kind"]
    name = f"pane-{index + 1}"
    choices = [(label, key) for key, label in KINDS.items()] + [("off", OFF)]
    kind = gr.Dropdown(choices=choices, value=kind_value, label=f"pane {index + 1}", elem_id=f"{name}-kind")
    sigma_rel = gr.Number(
        value=0.15,
        label="sigma_rel (post-hoc EMA width, e.g. 0.05–0.25)",
        precision=None,
        visible=kind_value == "posthoc",
        elem_id=f"{name}-sigma",
    )
    with gr.Row():
        k = gr.Number(
            value=default.get("k", 3),
            label="k (newest checkpoints)",
            precision=0,
            visible=kind_value == "merge",
            elem_id=f"{name}-k",
        )
        method = gr.Dropdown(
            choices=[("mean", "mean"), ("WSM (1-sqrt)", "wsm")],
            value="mean",
            label="merge",
            visible=kind_value == "merge",
            elem_id=f"{name}-method",
        )
    other = gr.Dropdown(
        choices=catalog.labels,
        value=catalog.labels[0],
        label="whose EMA",
        visible=kind_value == "checkpoint_ema",
        elem_id=f"{name}-checkpoint",
    )
    first = pane_header(index, None) if kind_value == OFF else f"**pane {index + 1}** · {KINDS[kind_value]}"
    header = gr.Markdown(first, elem_id=f"{name}-header")
    text = gr.Textbox(
        label="text",
        show_label=False,
        lines=2,
        max_lines=6,
        interactive=False,
        visible=kind_value != OFF,
        elem_id=f"{name}-output",
    )
    tokens = gr.HTML("", elem_id=f"{name}-tokens")
    command = gr.Code(
        value="",
        language="shell",
        label="command for these weights",
        interactive=False,
        wrap_lines=True,
        show_line_numbers=False,
        lines=1,
        max_lines=3,
        visible=False,
        elem_id=f"{name}-command",
    )
    return PaneControls(index, kind, sigma_rel, k, method, other, header, text, tokens, command)


def build_page(context: AppContext, title: str) -> Page:
    """Every part of the page, top to bottom, inside the current `gr.Blocks`."""
    header = build_header(context, title)
    request = build_request(context)
    panes = []
    with gr.Row(equal_height=False):
        for index, default in enumerate(_default_panes(context.catalog)):
            with gr.Column(min_width=240, elem_id=f"pane-{index + 1}"):
                panes.append(build_pane(context.catalog, index, default))
    scores = gr.HTML("", elem_id="scores")
    return Page(**header, **request, scores=scores, panes=panes)

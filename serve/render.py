"""HTML and Markdown for the comparison page: the token view, the score matrix, each pane's header.

Pure functions of a `serve.compare.Comparison` (no Gradio), so the page's content can be checked without a browser.
Numbers the page shows rounded are also in `data-` attributes at full precision.
"""

from __future__ import annotations

import html
import math

from .compare import Comparison, PaneResult

__all__ = ["pane_header", "scores_html", "token_view_html"]

#: Tokens are shaded by `1 - p`: an unlikely token (under the pane's own model) is dark, a near-certain one clear.
_SHADE_RGB = "255, 120, 0"


def _pane_name(index: int, pane: PaneResult) -> str:
    return f"pane {index + 1}: {pane.label or pane.spec}"


def pane_header(index: int, pane: PaneResult | None) -> str:
    """Markdown above a pane's text: its title and note, or why it could not be built.

    Args:
        index (`int`): The pane's position (0-based).
        pane (`PaneResult`, *optional*): The pane's result; `None` for a pane that is off.
    """
    if pane is None:
        return f"**pane {index + 1}** · off"
    if pane.error:
        return f"**pane {index + 1}** · `{pane.spec}`\n\n⚠️ {pane.error}"
    lines = [f"**pane {index + 1}** · {pane.label}"]
    if pane.note:
        lines.append(f"<small>{html.escape(pane.note)}</small>")
    return "\n\n".join(lines)


def _visible(piece: str) -> str:
    # Newlines and tabs would be invisible in a token box: show them, keep the line break.
    return html.escape(piece).replace("\t", "⇥").replace("\n", "↵\n")


def token_view_html(index: int, pane: PaneResult | None, divergence: int | None) -> str:
    """The pane's tokens, each shaded by its probability under the pane's own model, the first divergence marked.

    Each token is a `span.tok` with `data-i` (its position) and `data-p` (its probability); the token at the first
    divergence also has the class `diverge` and is preceded by a `▼` marker.

    Args:
        index (`int`): The pane's position (0-based).
        pane (`PaneResult`, *optional*): The scored pane; `None` (or one without tokens) gives an empty view.
        divergence (`int`, *optional*): Position of the first token where the panes differ.
    """
    if pane is None or pane.error or not pane.pieces:
        return f'<div class="hfema-tokens" id="hfema-tokens-{index + 1}" data-count="0"></div>'
    spans = []
    for i, (piece, p) in enumerate(zip(pane.pieces, pane.probs)):
        alpha = 0.85 * (1.0 - p)
        style = f"background: rgba({_SHADE_RGB}, {alpha:.3f}); border-radius: 3px; padding: 0 1px;"
        classes = "tok"
        marker = ""
        if divergence is not None and i == divergence:
            classes += " diverge"
            style += " outline: 2px solid #c00000; outline-offset: 1px;"
            marker = '<span class="diverge-marker" style="color: #c00000; font-weight: bold;">▼</span>'
        spans.append(
            f'{marker}<span class="{classes}" data-i="{i}" data-p="{p!r}" title="token {i}: p = {p:.4f}" '
            f'style="{style}">{_visible(piece)}</span>'
        )
    where = "none" if divergence is None else str(divergence)
    return (
        f'<div class="hfema-tokens" id="hfema-tokens-{index + 1}" data-count="{len(spans)}" '
        f'data-divergence="{where}" style="white-space: pre-wrap; overflow-wrap: anywhere; font-family: monospace; line-height: 1.7;">'
        + "".join(spans)
        + "</div>"
    )


def _cell(nll: float, row: int, col: str, best: bool) -> str:
    ppl = math.exp(nll) if nll < 700 else math.inf
    text = f"{nll:.4f}<br><small>ppl {ppl:.4g}</small>"
    if best:
        text = f"<b>{text}</b>"
    return f'<td data-row="{row}" data-col="{col}" data-nll="{nll!r}" data-ppl="{ppl!r}">{text}</td>'


def scores_html(result: Comparison) -> str:
    """The score matrix: mean per-token negative log-likelihood (and perplexity) of each pane's text (columns) under
    each pane's model (rows), plus each model's loss on the reference text when there is one.

    Cells carry `data-row` (the model's pane, 0-based), `data-col` (the text's pane, or `reference`) and `data-nll`
    / `data-ppl` at full precision. In each column the lowest value (the model that finds the text most likely) is
    bold.

    Args:
        result (`Comparison`): A scored comparison.
    """
    if result.nll is None or not result.scored:
        return '<div id="hfema-scores-table"></div>'
    names = [_pane_name(i, result.panes[i]) for i in result.scored]
    n = len(result.scored)
    columns = [[result.nll[r][c] for r in range(n)] for c in range(n)]
    best = [min(range(n), key=lambda r, c=c: columns[c][r]) for c in range(n)]
    head = "".join(f"<th>text of {html.escape(name)}</th>" for name in names)
    if result.reference_nll is not None:
        head += "<th>reference text</th>"
        best_ref = min(range(n), key=lambda r: result.reference_nll[r])
    rows = []
    for r, name in enumerate(names):
        cells = "".join(
            _cell(result.nll[r][c], result.scored[r], str(result.scored[c]), best[c] == r) for c in range(n)
        )
        if result.reference_nll is not None:
            cells += _cell(result.reference_nll[r], result.scored[r], "reference", best_ref == r)
        rows.append(f"<tr><th>model of {html.escape(name)}</th>{cells}</tr>")
    caption = (
        "Mean negative log-likelihood per token (nats; perplexity = exp) of each pane's text, as a continuation of "
        "the prompt, under each pane's model. Lower: the model finds the text more likely; the lowest in each "
        "column is bold."
    )
    summary = ""
    if result.reference_nll is not None:
        summary = (
            f'<p id="hfema-reference-best">Lowest loss on the reference text: <b>{html.escape(names[best_ref])}</b> '
            f"({result.reference_nll[best_ref]:.4f} nats per token).</p>"
        )
    divergence = (
        "The panes agree on every generated token."
        if result.divergence is None
        else f"The panes first differ at token {result.divergence} (marked ▼ in each pane's token view)."
    )
    if len(result.scored) < 2:
        divergence = ""
    return (
        f'<div id="hfema-scores-table"><table class="hfema-scores" style="border-collapse: collapse;">'
        f"<caption style='caption-side: top; text-align: left;'>{caption}</caption>"
        f"<tr><th>model ↓ · text →</th>{head}</tr>{''.join(rows)}</table>{summary}"
        f'<p id="hfema-divergence" data-divergence="{result.divergence if result.divergence is not None else "none"}">'
        f"{divergence}</p></div>"
    )

"""HTML and Markdown for the comparison page: the EMA settings, each pane's header and progress, the token view, the
score matrix.

Pure functions (no Gradio), so the page's content can be checked without a browser. Numbers the page shows rounded
are also in `data-` attributes at full precision.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .compare import Comparison, PaneResult
from .loading import CheckpointRef

__all__ = ["ema_settings", "pane_header", "scores_html", "token_view_html"]

#: Tokens are shaded by `1 - p`: an unlikely token (under the pane's own model) is dark, a near-certain one clear.
_SHADE_RGB = "255, 120, 0"


def _pane_name(index: int, pane: PaneResult) -> str:
    return f"pane {index + 1}: {pane.label or pane.spec}"


def _averaging(config: dict[str, Any]) -> str:
    """How the EMA averages, from its saved config: its decay, half-life, power-function width or BEMA."""
    bema = config.get("bema")
    if isinstance(bema, dict):
        return f"BEMA (η {bema.get('eta', 0.2):g}, κ {bema.get('kappa', 0.5):g}, τ {bema.get('tau', 0)})"
    if config.get("sigma_rel") is not None:
        return f"power function, σ_rel {config['sigma_rel']:g}"
    if config.get("half_life") is not None:
        text = f"half-life {config['half_life']:g} steps"
    elif config.get("decay") is not None:
        text = f"decay {config['decay']:g}"
    else:
        return "n/a"
    if config.get("warmup"):
        text += f", warm-up (power {config.get('power', 2 / 3):.3g})"
    return text


def ema_settings(info: dict[str, Any], ref: CheckpointRef) -> str:
    """Markdown for the page's header: the checkpoint, then its EMA's settings as one short table (how it averages,
    the last decay, its dtype, its update interval, the step and the number of updates).

    Args:
        info (`dict`): The EMA's `ema_state.json` (`{}` when there is none).
        ref (`CheckpointRef`): The checkpoint.
    """
    where = ref.location if ref.is_local else f"{ref.location} (Hub)"
    head = f"**Checkpoint** `{ref.label}` · `{where}`"
    if not info:
        return f"{head}\n\nNo `ema_state.json` found: the EMA's step and settings are unknown."
    config = info.get("config") or {}
    every = config.get("update_every", 1)
    decay = info.get("decay")
    updates = str(info.get("num_updates", "n/a"))
    if info.get("num_skipped"):
        updates += f" ({info['num_skipped']} skipped)"
    row = [
        _averaging(config),
        f"{decay:.6g}" if isinstance(decay, (int, float)) else "n/a",
        str(config.get("dtype", "n/a")),
        "every step" if every == 1 else f"every {every} steps",
        str(info.get("step", "n/a")),
        updates,
    ]
    return f"{head}\n\n| EMA | last decay | dtype | updated | step | updates |\n|---|---|---|---|---|---|\n| {' | '.join(row)} |"


def _progress_bar(done: int, total: int, width: int = 12) -> str:
    filled = round(width * done / total) if total else width
    return "▰" * filled + "▱" * (width - filled) + f" {done} / {total} tokens"


def pane_header(index: int, pane: PaneResult | None, progress: tuple[int, int] | None = None) -> str:
    """Markdown above a pane's text: its title and note, its progress while it runs, or why it could not be built.

    Args:
        index (`int`): The pane's position (0-based).
        pane (`PaneResult`, *optional*): The pane's result; `None` for a pane that is off.
        progress (`tuple[int, int]`, *optional*): While the pane runs: the tokens decoded so far and the most it
            decodes; `(0, 0)` while its variant is being built.
    """
    if pane is None:
        return f"**pane {index + 1}** · off"
    if pane.error:
        return f"**pane {index + 1}** · `{pane.spec}`\n\n⚠️ {pane.error}"
    lines = [f"**pane {index + 1}** · {pane.label or pane.spec}"]
    if progress is not None:
        lines.append("building its weights…" if progress == (0, 0) else _progress_bar(*progress))
    elif pane.note:
        lines.append(f"<small>{html.escape(pane.note)}</small>")
    return "\n\n".join(lines)


def _newlines_only(piece: str) -> bool:
    return "\n" in piece and not piece.strip()


def _visible(piece: str, line_break: bool) -> str:
    # Newlines and tabs would be invisible in a token box: shown as ↵ and ⇥, with one real line break after a token
    # that ends a line.
    return html.escape(piece).replace("\t", "⇥").replace("\n", "↵") + ("\n" if line_break else "")


def token_view_html(index: int, pane: PaneResult | None, divergence: int | None) -> str:
    """The pane's tokens, each shaded by its probability under the pane's own model, the first divergence marked.

    Each token is a `span.tok` with `data-i` (its position) and `data-p` (its probability); the token at the first
    divergence also has the class `diverge` and is preceded by a `▼` marker. Newlines show as `↵`; a run of tokens
    that are only newlines shares one line, with one line break after the run, so a text full of blank lines stays
    compact (the text box above shows the text as it is).

    Args:
        index (`int`): The pane's position (0-based).
        pane (`PaneResult`, *optional*): The scored pane; `None` (or one without tokens) gives an empty view.
        divergence (`int`, *optional*): Position of the first token where the panes differ.
    """
    if pane is None or pane.error or not pane.pieces:
        return f'<div class="hfema-tokens" id="hfema-tokens-{index + 1}" data-count="0"></div>'
    spans = []
    pieces = pane.pieces
    for i, (piece, p) in enumerate(zip(pieces, pane.probs)):
        line_break = "\n" in piece and not (i + 1 < len(pieces) and _newlines_only(pieces[i + 1]))
        alpha = 0.85 * (1.0 - p)
        style = f"background: rgba({_SHADE_RGB}, {alpha:.3f});"
        classes = "tok"
        marker = ""
        if divergence is not None and i == divergence:
            classes += " diverge"
            marker = '<span class="diverge-marker">▼</span>'
        spans.append(
            f'{marker}<span class="{classes}" data-i="{i}" data-p="{p!r}" title="token {i}: p = {p:.4f}" '
            f'style="{style}">{_visible(piece, line_break)}</span>'
        )
    where = "none" if divergence is None else str(divergence)
    return (
        f'<div class="hfema-tokens" id="hfema-tokens-{index + 1}" data-count="{len(spans)}" '
        f'data-divergence="{where}">' + "".join(spans) + "</div>"
    )


def _cell(nll: float, row: int, col: str, best: bool) -> str:
    ppl = math.exp(nll) if nll < 700 else math.inf
    text = f"{nll:.4f} <small>(ppl {ppl:.4g})</small>"
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
        f'<div id="hfema-scores-table"><p class="hfema-caption">{caption}</p>'
        f'<table class="hfema-scores" style="border-collapse: collapse;">'
        f"<tr><th>model ↓ · text →</th>{head}</tr>{''.join(rows)}</table>{summary}"
        f'<p id="hfema-divergence" data-divergence="{result.divergence if result.divergence is not None else "none"}">'
        f"{divergence}</p></div>"
    )

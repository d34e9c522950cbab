"""A self-contained HTML report of an attribution result: one file, inline CSS, figures embedded
as base64 PNG (also written next to it), nothing fetched from the network.

Sections: a summary; the top nodes with their estimates (and exact effects when verified); per
node type a heatmap; the prompts with each token coloured by the attribution at its position.
"""

from __future__ import annotations

import base64
import html
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import plugins
from .plots import heatmap
from .result import AttributionResult

MAX_COLUMNS = 64  # node axes wider than this (neurons, SAE features) are summed in the heatmap instead of positions


@dataclass(frozen=True)
class Grid:
    """What a heatmap shows: ``values`` ``[rows, cols]`` and how it was reduced from the scores."""

    values: torch.Tensor
    ylabel: str
    xlabel: str
    reduction: str


def heatmap_grid(result: AttributionResult, key: str) -> Grid:
    """The 2-D view of ``result.scores[key]`` a heatmap shows, one row per layer: layer x head
    (summed over positions) when the node axes are narrow, layer x position (summed over the nodes
    at each position) when they are wide (neurons, SAE features) or absent (residual vectors)."""
    scores, dims = result.scores[key].detach().double().cpu(), result.dims[key]
    rows = scores.shape[0] if dims[0] == "layer" else 1
    ylabel = "layer" if dims[0] == "layer" else ""
    others = [i for i, d in enumerate(dims) if d not in ("layer", "pos")]
    width = math.prod(scores.shape[i] for i in others)
    if "pos" not in dims:
        return Grid(scores.reshape(rows, -1), ylabel, ", ".join(dims[i] for i in others), "as is")
    pos = dims.index("pos")
    if others and width <= MAX_COLUMNS:
        return Grid(scores.sum(pos).reshape(rows, width), ylabel, ", ".join(dims[i] for i in others),
                    "summed over positions")
    summed = scores.sum(others) if others else scores
    return Grid(summed.reshape(rows, scores.shape[pos]), ylabel, "pos",
                f"summed over the {', '.join(dims[i] for i in others)} axis" if others else "per position")


def token_scores(result: AttributionResult, pair: int) -> torch.Tensor:
    """The attribution at each position of one pair, alone: the sum of the method's scores over
    every node at that position, ``[pos]`` (0 at padding).

    Recomputed with the same engine, method and node types on that pair only; for the AtP family
    (scores are means over pairs of per-pair magnitudes) the mean over pairs of these vectors is
    ``result.scores`` summed over all but the position axis.
    """
    engine = result.require_engine("per-token scores")
    single = engine.restricted([pair])
    single.progress = False  # one bar per shown prompt would drown the report's own output
    backend = plugins.backends().get(result.method)
    if backend is None:
        raise ValueError(f"per-token scores rerun the method by name, and {result.method!r} is not a registered "
                         "backend")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the full run already warned (e.g. few layers for GradDrop)
        scores, *_ = backend.run(single)
    total = torch.zeros(engine.pairs.width, dtype=torch.float64)
    for key, value in scores.items():
        dims = result.dims[key]
        if "pos" in dims:
            p = dims.index("pos")
            total += value.detach().double().cpu().movedim(p, 0).reshape(value.shape[p], -1).sum(-1)
    return total


def figure_path(path: str | Path, key: str) -> Path:
    """Where ``write_report(result, path)`` writes the heatmap of result key ``key``: beside the HTML,
    ``<stem>_<key>.png`` with every character of ``key`` other than letters, digits, ``_`` and ``-``
    replaced by ``_`` (``out.html``, ``sae:blocks.2.hook_resid_pre`` -> ``out_sae_blocks_2_hook_resid_pre.png``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.png")


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(frame: pd.DataFrame, css_class: str) -> str:
    frame = frame.loc[:, [c for c in frame.columns if not frame[c].isna().all()]]  # e.g. no signed value for GradDrop
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = "".join(f"<td>{_cell(v)}</td>" for v in row)
        body.append(f'<tr class="node-row">{cells}</tr>')
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return html.escape(str(value))


def _tokens(result: AttributionResult, ids: list[int]) -> list[str]:
    model = getattr(result.require_engine("the report").host, "model", None)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def _prompt_html(result: AttributionResult, pair: int, scores: torch.Tensor, top: float, label: str) -> str:
    pairs = result.require_engine("the report").pairs.select(torch.tensor([pair]))  # read from a stream
    real = pairs.mask[0].cpu()
    clean = pairs.clean[0].cpu()[real].tolist()
    corrupt = pairs.corrupt[0].cpu()[real].tolist()
    values = scores[real].tolist()
    spans = []
    for tok, c_tok, c_text, value in zip(clean, corrupt, _tokens(result, corrupt), values):
        alpha = 0.0 if top <= 0 else min(1.0, value / top)
        differs = tok != c_tok
        title = f"score {value:.4g}" + (f"; corrupt: {c_text!r}" if differs else "")
        cls = "tok differs" if differs else "tok"
        spans.append(f'<span class="{cls}" style="background: rgba(230, 85, 13, {alpha:.3f})" '
                     f'data-score="{value:.6g}" title="{html.escape(title)}">')
    texts = _tokens(result, clean)
    body = "".join(f"{open_}{html.escape(text)}</span>" for open_, text in zip(spans, texts))
    return f'<div class="prompt"><div class="prompt-label">{html.escape(label)}</div>{body}</div>'


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.summary td { padding: 0.1em 1em 0.1em 0; } .summary td:first-child { color: #666; }
table.nodes { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
table.nodes th, table.nodes td { border-bottom: 1px solid #eee; padding: 0.25em 0.8em; text-align: right; }
table.nodes th:first-child, table.nodes td:first-child { text-align: left; }
table.nodes th { background: #f6f6f6; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 640px; } figcaption { color: #666; font-size: 0.85em; }
.prompt { margin: 0.6em 0; font-family: ui-monospace, monospace; }
.prompt-label { font-family: system-ui, sans-serif; color: #666; font-size: 0.8em; }
.tok { padding: 0.1em 0.15em; margin: 0 1px; border-radius: 3px; display: inline-block; }
.tok.differs { outline: 1px dashed #444; }
.note { color: #666; font-size: 0.85em; }
"""


def write_report(result: AttributionResult, path: str | Path, *, verified: pd.DataFrame | None = None,
                 top_k: int = 20, prompts: int = 6, model_label: str = "", metric_label: str = "",
                 prompt_labels: list[str] | None = None) -> Path:
    """Write the report to ``path`` (HTML, figures embedded) and its figures also next to it,
    ``<stem>_<result key>.png`` (``figure_path``), overwriting files of those names.

    ``verified``: ``result.verify(k)`` when the top nodes were verified (their exact effects are
    shown); ``top_k``: rows of the top-nodes table; ``prompts``: how many pairs to show token by
    token (each costs one attribution of that pair); ``prompt_labels``: a caption per pair (e.g.
    the answer). Returns the HTML path.
    """
    result.require_engine("write_report")
    if top_k < 1 or prompts < 0:
        raise ValueError(f"top_k must be at least 1 and prompts at least 0, got {top_k} and {prompts}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = result.to_frame()
    n_nodes = len(frame)

    summary = [("model", model_label), ("method", result.method), ("metric", metric_label),
               ("pairs", str(result.n_pairs)), ("node types", ", ".join(result.scores)), ("nodes", str(n_nodes)),
               ("alignment", result.alignment)]
    parts = ['<h1>AtP attribution report</h1><table class="summary">'
             + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary if v)
             + "</table>"]

    parts.append('<h2 id="top-nodes">Top nodes</h2>')
    if verified is not None:
        shown = verified[["node", "estimate", "signed_estimate", "effect", "mean_abs_effect"]].rename(columns={
            "estimate": "score", "signed_estimate": "signed estimate", "effect": "verified mean effect",
            "mean_abs_effect": "verified mean |effect|"})
        parts.append(f'<p class="note">The top {len(shown)} nodes by {html.escape(result.method)} score, each '
                     "verified by exact activation patching: the effect per pair averaged signed, and as "
                     "magnitudes (what the AtP scores, means of per-pair magnitudes, estimate).</p>")
    else:
        shown = frame.nlargest(top_k, "score")[["node", "score", "signed"]]
        parts.append(f'<p class="note">The top {len(shown)} of {n_nodes} nodes by {html.escape(result.method)} '
                     "score (not verified).</p>")
    parts.append(_table(shown, "nodes top-nodes"))

    for key in result.scores:
        grid = heatmap_grid(result, key)
        figure = heatmap(grid.values, figure_path(path, key), xlabel=grid.xlabel, ylabel=grid.ylabel,
                         title=f"{key}: {result.method} score, {grid.reduction}")
        of_type = frame[frame["node_type"] == key].nlargest(5, "score")[["node", "score", "signed"]]
        parts.append(f'<h2 class="node-type" id="type-{html.escape(key)}">{html.escape(key)}</h2><div class="row">'
                     f'<figure><img alt="{html.escape(key)} heatmap" src="{_png(figure)}">'
                     f"<figcaption>{html.escape(grid.ylabel)} &times; {html.escape(grid.xlabel)}, "
                     f"{html.escape(grid.reduction)}</figcaption></figure>"
                     + _table(of_type, "nodes type-top") + "</div>")

    shown_pairs = min(prompts, result.n_pairs)
    if shown_pairs:
        per_pair = [token_scores(result, i) for i in range(shown_pairs)]
        top = max(float(s.max()) for s in per_pair)
        parts.append('<h2 id="prompts">Prompts</h2><p class="note">Each clean-prompt token shaded by the attribution '
                     "at its position for that pair alone: the sum of the scores of every node there (darker = "
                     "more). Dashed: the corrupt prompt has a different token here (hover for it and the score).</p>")
        for i, scores in enumerate(per_pair):
            label = f"pair {i}" + (f": {prompt_labels[i]}" if prompt_labels and i < len(prompt_labels) else "")
            parts.append(_prompt_html(result, i, scores, top, label))

    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>AtP report: {html.escape(result.method)}</title><style>{CSS}</style></head><body>"
            + "".join(parts) + "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path

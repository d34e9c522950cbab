"""Self-contained HTML reports: one file, inline CSS, figures embedded (base64 PNG or inline SVG),
nothing fetched from the network, so a report opens offline and can be mailed as one file.

``write_report`` (nodes, an ``AttributionResult``): a summary; the top nodes with their estimates
(and exact effects when verified); per node type a heatmap (PNG, also written next to it); the
prompts with each token coloured by the attribution at its position.

``write_circuit_report`` (edges, an ``EdgeResult`` and a ``Circuit``): a summary with the circuit's
faithfulness; the circuit drawn as a graph layered by depth (``edges.svg.circuit_svg``); the
faithfulness curve over circuit sizes with MIB's summaries (``edges.svg.curve_svg``); the top edges
with their estimates (and exact effects when verified). Both share the page, tables and style here.
"""

from __future__ import annotations

import base64
import html
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from . import plugins
from .edges.circuit import Circuit, FaithfulnessCurve, faithfulness_of
from .edges.result import EdgeResult
from .edges.svg import circuit_svg, curve_svg
from .engine import distributed
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
        with distributed.alone():  # one pair: every rank reruns it alone
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


def _table(frame: pd.DataFrame, css_class: str, row_class: str = "node-row") -> str:
    """``frame`` as an HTML table (floats to 4 significant digits), without all-missing columns."""
    frame = frame.loc[:, [c for c in frame.columns if not frame[c].isna().all()]]  # e.g. no signed value for GradDrop
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = "".join(f"<td>{_cell(v)}</td>" for v in row)
        body.append(f'<tr class="{row_class}">{cells}</tr>')
    return f'<table class="data {css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _verified_columns(verified: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """A ``verify()`` frame's ``names`` columns, its estimates and its exact effects, titled for a
    report table (nodes and edges alike)."""
    return verified[[*names, "estimate", "signed_estimate", "effect", "mean_abs_effect"]].rename(columns={
        "estimate": "score", "signed_estimate": "signed estimate", "effect": "verified mean effect",
        "mean_abs_effect": "verified mean |effect|"})


def _summary(rows: list[tuple[str, str]], css_class: str = "summary") -> str:
    """Label / value rows as a two-column table, rows with an empty value left out."""
    return (f'<table class="{css_class}">' + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows if v) + "</table>")


def _page(path: Path, title: str, parts: list[str]) -> Path:
    """Write the HTML page of ``parts`` (the body's pieces) with the shared style to ``path``."""
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>" + "".join(parts) + "</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


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
table.data { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
table.data th, table.data td { border-bottom: 1px solid #eee; padding: 0.25em 0.8em; text-align: right; }
table.data th:first-child, table.data td:first-child { text-align: left; }
table.data th { background: #f6f6f6; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 640px; } figcaption { color: #666; font-size: 0.85em; }
figure svg { max-width: 100%; height: auto; }
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
    parts = ["<h1>AtP attribution report</h1>", _summary(summary)]

    parts.append('<h2 id="top-nodes">Top nodes</h2>')
    if verified is not None:
        shown = _verified_columns(verified, ["node"])
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

    return _page(path, f"AtP report: {result.method}", parts)


def write_circuit_report(result: EdgeResult, circuit: Circuit, path: str | Path, *,
                         curve: FaithfulnessCurve | None = None, verified: pd.DataFrame | None = None,
                         faithfulness: float | None = None, top_k: int = 20, model_label: str = "",
                         metric_label: str = "", circuit_label: str = "", notes: Mapping[str, str] | None = None
                         ) -> Path:
    """Write the circuit report to ``path`` (one HTML file, its two pictures inline SVG), overwriting it.

    ``circuit``: built from ``result`` (``top_circuit``, ``threshold_circuit``, ``Circuit.from_names``
    on ``result.graph``), drawn with edge widths by ``result.scores`` (summed over the positions kept);
    ``curve``: ``faithfulness_curve(result)`` (without it the section says how to get it);
    ``verified``: ``result.verify(k)`` (the top-edges table then shows the exact effects);
    ``faithfulness``: the circuit's, when already computed (otherwise computed here: clean, corrupt
    and one patched run per pair); ``top_k``: rows of the top-edges table when not verified;
    ``circuit_label``: how the circuit was chosen (e.g. "top 40, dangling edges pruned"); ``notes``:
    node name -> text drawn under the node (e.g. ``edges.activating_tokens``).
    Returns the HTML path.
    """
    if not isinstance(result, EdgeResult) or not isinstance(circuit, Circuit):
        raise TypeError(f"write_circuit_report takes an EdgeResult and a Circuit, got {type(result).__name__} and "
                        f"{type(circuit).__name__} (a node result's report is write_report)")
    if circuit.graph.names != result.graph.names:
        raise ValueError("the circuit was built on another model's graph (its edges differ from the result's)")
    n = result.scores.numel()
    if tuple(circuit.keep.shape) not in ((result.graph.n_edges,), tuple(result.scores.shape)):
        raise ValueError(f"the circuit keeps {tuple(circuit.keep.shape)} (edge[, pos]) but the result scores "
                         f"{tuple(result.scores.shape)}")
    if curve is not None and curve.sizes != tuple(int(p * n) for p in curve.percentages):
        raise ValueError(f"the curve's circuit sizes {curve.sizes} are not int(p * {n}) of the result's {n} "
                         "edge scores: pass faithfulness_curve(result) of this result")
    needed = {"edge", "estimate", "signed_estimate", "effect", "mean_abs_effect"}
    if verified is not None and not needed <= set(verified.columns):
        lacking = sorted(needed - set(verified.columns))
        raise ValueError(f"verified must be result.verify(k); it lacks the columns {lacking}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int of at least 1, got {top_k!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = faithfulness_of(result, [circuit])[0] if faithfulness is None else float(faithfulness)

    edges = circuit.edges()
    positions = result.scores.shape[1] if result.per_position else 0
    size = (f"{circuit.n_edges} edge-positions of {len(edges)} edges" if circuit.per_position
            else f"{circuit.n_edges} edges")
    summary = [("model", model_label), ("method", result.method), ("metric", metric_label),
               ("pairs", str(result.n_pairs)),
               ("edges scored", f"{result.graph.n_edges}" + (f" x {positions} positions" if positions else "")),
               ("circuit", size + (f" ({circuit_label})" if circuit_label else "")), ("faithfulness", f"{f:.4g}"),
               ("alignment", result.alignment)]
    parts = ["<h1>AtP circuit report</h1>", _summary(summary),
             '<p class="note">Faithfulness: (L(circuit) &minus; L(corrupt)) / (L(clean) &minus; L(corrupt)), means '
             "over pairs, with every edge outside the circuit fed its sender's corrupt value: 1 is the full model, "
             "0 the corrupt run.</p>"]

    weighting = "summed over the positions kept" if circuit.per_position else (
        "summed over positions" if result.per_position else "")
    parts.append('<h2 id="circuit">Circuit</h2><figure class="circuit">'
                 + circuit_svg(circuit, result.scores, f"{len(edges)} edges, faithfulness {f:.3f}", notes)
                 + "<figcaption>Components layered by depth: the embedding at the bottom, each layer's heads then "
                 f"its MLP, the logits on top. Edge width proportional to the {html.escape(result.method)} score"
                 + (f" ({weighting})" if weighting else "") + "; colour: what the edge feeds (hover an edge for "
                 "its name and score).</figcaption></figure>")

    parts.append('<h2 id="curve">Faithfulness curve</h2>')
    if curve is None:
        parts.append('<p class="note">Not computed: pass <code>curve=faithfulness_curve(result)</code> '
                     "(<code>atp circuit --report</code> computes it).</p>")
    else:
        points = pd.DataFrame({"p": list(curve.percentages), "top n edges": list(curve.sizes),
                               "kept after pruning": list(curve.kept), "faithfulness": list(curve.faithfulness)})
        numbers = [("CPR (area under the curve)", f"{curve.cpr:.4g}"),
                   ("CMD (area between the curve and 1)", f"{curve.cmd:.4g}"),
                   ("average faithfulness", f"{curve.average:.4g}"),
                   ("forward passes (of one prompt)", str(curve.forward_passes))]
        parts.append('<p class="note">Faithfulness of the top int(p &middot; edges) edges, dangling edges pruned, '
                     "for each fraction p (MIB's circuit-localization sizes by default); CPR and CMD by the "
                     "trapezoidal rule over p, as MIB computes them.</p><div class=\"row\"><figure>"
                     + curve_svg(curve) + "</figure>" + _table(points, "curve-points", "curve-row") + "</div>"
                     + _summary(numbers, "summary curve-summary"))

    parts.append('<h2 id="top-edges">Top edges</h2>')
    where = ["edge", "pos"] if result.per_position else ["edge"]
    if verified is not None:
        shown = _verified_columns(verified, where)
        parts.append(f'<p class="note">The top {len(shown)} edges by {html.escape(result.method)} score, each '
                     "verified by exact single-edge patching: the effect per pair averaged signed, and as magnitudes "
                     "(what the scores, means of per-pair magnitudes, estimate).</p>")
    else:
        shown = result.top(top_k)[[*where, "score", "signed"]]
        parts.append(f'<p class="note">The top {len(shown)} of {n} edge scores by {html.escape(result.method)} '
                     "score (not verified).</p>")
    shown = shown.reset_index(drop=True)
    shown["in circuit"] = _in_circuit(circuit, shown)
    parts.append(_table(shown, "top-edges", "edge-row"))
    return _page(path, f"AtP circuit: {result.method}", parts)


def _in_circuit(circuit: Circuit, rows: pd.DataFrame) -> list[str]:
    """"yes" / "no" per row (``edge`` and, for a per-position result, ``pos``) by the circuit's keep mask."""
    edge_of = circuit.graph.edge_of
    kept = []
    for i, name in enumerate(rows["edge"]):
        keep = circuit.keep[edge_of[name]]
        if circuit.per_position:
            keep = keep[int(rows["pos"].iloc[i])] if "pos" in rows else keep.any()
        kept.append("yes" if bool(keep) else "no")
    return kept

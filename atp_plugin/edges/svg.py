"""A circuit as a self-contained SVG picture: components layered by depth (the embedding at the
bottom, then each layer's heads and its MLP, the logits on top), one curve per kept edge, its width
proportional to the edge's score and its colour saying what it feeds (query, key, value, MLP,
logits). Plain SVG text, no script, no fonts or anything else fetched."""

from __future__ import annotations

from html import escape
from pathlib import Path

import torch

from .circuit import Circuit
from .graph import Graph

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", "mlp": "#7f7f7f", "logits": "#9467bd"}
ROW, COL, MARGIN, MAX_WIDTH = 70, 64, 50, 9.0


def _component(graph: Graph, receiver: int) -> list[str]:
    """Names of the components (sender names, or "logits") a receiver belongs to."""
    r = graph.receivers[receiver]
    if r.kind == "logits":
        return ["logits"]
    if r.kind == "mlp":
        return [r.name]
    group = graph.n_heads // graph.n_kv
    heads = [r.head] if r.kind == "q" else range(r.head * group, (r.head + 1) * group)
    return [f"L{r.layer}.H{h}" for h in heads]


def circuit_svg(circuit: Circuit, weights: torch.Tensor, title: str = "") -> str:
    """The picture of ``circuit`` as SVG text; ``weights`` ``[edge]`` (or ``[edge, pos]``, summed
    over the kept positions) set the edge widths, the largest drawn ``MAX_WIDTH`` px wide."""
    g = circuit.graph
    keep = circuit.keep
    w = (weights.abs() * keep).sum(-1) if circuit.per_position else weights.abs() * keep  # [edge]
    kept = keep.any(-1) if circuit.per_position else keep
    edges = kept.nonzero().flatten().tolist()
    top = max((float(w[e]) for e in edges), default=0.0) or 1.0

    # rows: 0 embedding, 2l + 1 heads of layer l, 2l + 2 MLP l, 2L + 1 logits; a row of heads lists them all
    n_rows = 2 * g.n_layers + 2
    width = max(2 * MARGIN + COL * (g.n_heads + 1), 8 * len(title))  # a column per head, the MLPs in the last
    height = 2 * MARGIN + ROW * (n_rows - 1) + (24 if title else 0)
    at: dict[str, tuple[float, float]] = {}
    centre = MARGIN + COL * (g.n_heads + 1) / 2
    y = lambda row: height - MARGIN - ROW * row  # noqa: E731 - one line of geometry
    at["embed"] = (centre, y(0))
    at["logits"] = (centre, y(n_rows - 1))
    for layer in range(g.n_layers):
        for h in range(g.n_heads):
            at[f"L{layer}.H{h}"] = (MARGIN + COL * (h + 0.5), y(2 * layer + 1))
        at[f"mlp{layer}"] = (MARGIN + COL * (g.n_heads + 0.5), y(2 * layer + 2))
    used = {"embed", "logits"}
    lines = []
    for e in edges:
        s = g.senders[int(g.sender_index[e])].name
        r = int(g.receiver_index[e])
        kind = g.receivers[r].kind
        for target in _component(g, r):
            used |= {s, target}
            (x0, y0), (x1, y1) = at[s], at[target]
            bend = (x0 + x1) / 2 + 0.25 * (y0 - y1) * (1 if (x1 >= x0) else -1) * 0.3
            stroke = max(0.6, MAX_WIDTH * float(w[e]) / top)
            lines.append(f'<path d="M{x0:.1f},{y0:.1f} Q{bend:.1f},{(y0 + y1) / 2:.1f} {x1:.1f},{y1:.1f}" '
                         f'stroke="{COLOURS[kind]}" stroke-width="{stroke:.2f}" fill="none" stroke-opacity="0.7">'
                         f'<title>{escape(g.names[e])}: {float(w[e]):.4g}</title></path>')
    nodes = []
    for name in sorted(used, key=lambda n: (at[n][1], at[n][0])):
        x, yy = at[name]
        nodes.append(f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="13" fill="#ffffff" stroke="#333333" stroke-width="1.2"/>'
                     f'<text x="{x:.1f}" y="{yy + 3.5:.1f}" font-size="9" text-anchor="middle" '
                     f'font-family="sans-serif">{escape(name)}</text>')
    legend = [f'<text x="{MARGIN + 70 * i}" y="{height - 12}" font-size="10" font-family="sans-serif" '
              f'fill="{c}">&#9644; {k}</text>' for i, (k, c) in enumerate(COLOURS.items())]
    head = (f'<text x="{width / 2:.1f}" y="18" font-size="12" text-anchor="middle" font-family="sans-serif">'
            f'{escape(title)}</text>') if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="#ffffff"/>\n{head}\n'
            + "\n".join(lines + nodes + legend) + "\n</svg>\n")


def write_circuit_svg(circuit: Circuit, weights: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Write ``circuit_svg`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(circuit_svg(circuit, weights, title), encoding="utf-8")
    return path

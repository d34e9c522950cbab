"""A circuit and its faithfulness curve as self-contained SVG pictures (plain SVG text: no script,
no fonts or anything else fetched), standalone files or inline in the HTML report.

The circuit: components layered by depth (the embedding at the bottom, then each layer's heads and
its MLP, the logits on top), one curve per kept edge (under grouped-query attention, one per query
head an edge into a shared key or value reaches), its width proportional to the edge's score and its
colour saying what it feeds (query, key, value, MLP, logits). The curve: faithfulness against the
fraction of edges kept, on a log axis (MIB's sizes span three decades).
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Mapping

import torch

from .circuit import Circuit, FaithfulnessCurve
from .graph import Graph

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#ff7f0e", "mlp": "#7f7f7f", "logits": "#9467bd"}
#: receivers drawn in another kind's colour: a dictionary's nodes at an MLP read as the MLP does
SAME = {"feature": "mlp", "error": "mlp", "rest": "mlp"}
ROW, MARGIN, MAX_WIDTH, MIN_WIDTH = 70, 50, 9.0, 0.6
#: labels' font size (px) and the width of a character at most, in em (sans-serif's widest, "m", is
#: 0.97 em but labels mix it with narrow ones: "mlp10" is 0.63 em a character in DejaVu Sans); the
#: title's characters at 12 px; the side margins (px), the least gap between the columns' circles (in
#: radii: room for edges to pass between them) and between an edge and a circle it does not join (px)
FONT, CHAR_EM, TITLE_EM, SIDE, GAP, CLEAR = 9, 0.7, 0.6, 24, 2, 3


def _component(graph: Graph, receiver: int) -> list[str]:
    """Names of the components (sender names, or "logits"; a head read whose layer writes through
    features: the head) a receiver belongs to."""
    r = graph.receivers[receiver]
    if r.kind == "logits":
        return ["logits"]
    if r.kind not in ("q", "k", "v"):  # an MLP or a dictionary node: its own sender
        return [r.name]
    group = graph.n_heads // graph.n_kv
    heads = [r.head] if r.kind == "q" else range(r.head * group, (r.head + 1) * group)
    return [f"L{r.layer}.H{h}" for h in heads]


def edge_weights(circuit: Circuit, weights: torch.Tensor) -> torch.Tensor:
    """What sets each edge's width in ``circuit_svg``: ``|weights|`` per edge ``[edge]``, float64.

    ``weights`` ``[edge]`` as is; ``[edge, pos]`` summed over the positions the circuit keeps the edge
    at (a per-position circuit), or over every position (a circuit keeping each edge at all of them,
    patched there at once). Shapes that do not fit the circuit's graph are a ValueError."""
    n = circuit.graph.n_edges
    if weights.ndim not in (1, 2) or weights.shape[0] != n:
        raise ValueError(f"weights must be [edge] or [edge, pos] with {n} edges (the circuit's graph), "
                         f"got shape {tuple(weights.shape)}")
    w = weights.detach().abs().double().cpu()
    if w.ndim == 1:
        return w
    if not circuit.per_position:
        return w.sum(-1)
    if w.shape != circuit.keep.shape:
        raise ValueError(f"weights {tuple(w.shape)} and the per-position circuit {tuple(circuit.keep.shape)} "
                         "must have the same shape")
    return (w * circuit.keep).sum(-1)


def circuit_svg(circuit: Circuit, weights: torch.Tensor, title: str = "", notes: Mapping[str, str] | None = None
                ) -> str:
    """The picture of ``circuit`` as SVG text; ``weights`` (``edge_weights``) set the edge widths,
    the largest drawn ``MAX_WIDTH`` px wide, none thinner than ``MIN_WIDTH``. Each edge's path has
    ``class="edge"`` and ``data-edge`` (its name), so the picture can be read back.

    Every circle holds its label (its radius is set by the longest label at ``CHAR_EM`` em a
    character, an upper bound for sans-serif fonts); the columns spread over the whole width (the
    title's, if wider), over the heads some layer uses; each edge leaves its sender's top and enters
    its receiver's bottom (queries left, keys middle, values right: no two edges coincide) and
    bends by the least that keeps it out of every circle it does not join (``_bends``), so edges
    between the same column's nodes (the MLPs) bow apart by how far they reach. A quadratic curve
    cannot always thread rows of many heads: there an edge takes the curve furthest from them.

    Dictionary nodes (features, error, rest) sit in the row of the component they split, features
    from the left, the error and rest nodes drawn apart at the right in a dashed grey circle;
    ``notes`` (node name -> text, e.g. the tokens a feature fires on) go under a node and into its
    tooltip."""
    g = circuit.graph
    w = edge_weights(circuit, weights)
    kept = circuit.keep.any(-1) if circuit.per_position else circuit.keep
    edges = kept.nonzero().flatten().tolist()
    top = max((float(w[e]) for e in edges), default=0.0) or 1.0
    ends = [(g.senders[int(g.sender_index[e])].name, target, e) for e in edges
            for target in _component(g, int(g.receiver_index[e]))]
    used = sorted({"embed", "logits"} | {n for s, t, _ in ends for n in (s, t)})

    # rows: 0 embedding, 2l + 1 heads of layer l, 2l + 2 MLP l, 2L + 1 logits (and a residual-stream
    # dictionary's between two); a column per head some layer uses, the MLPs in the last
    heads = sorted({int(n.split(".H")[1]) for n in used if n.startswith("L")})
    column = {h: i for i, h in enumerate(heads)}
    kind = {s.name: s for s in g.senders}
    apart = {n for n in used if n in kind and kind[n].kind in ("error", "rest")}
    rows: dict[float, list[str]] = {}  # a row's dictionary nodes, in drawing order
    for n in sorted((n for n in used if n in kind and kind[n].kind in ("feature", "error", "rest")),
                    key=lambda n: (kind[n].kind != "feature", kind[n].kind, kind[n].index)):
        rows.setdefault(kind[n].stage, []).append(n)
    mlp = any(n in kind and kind[n].kind == "mlp" for n in used)
    # one row per stage, a residual-stream dictionary's between the two it sits between
    row_of = {stage: i for i, stage in enumerate(sorted(set(range(2 * g.n_layers + 2)) | set(g.cuts)))}
    n_rows = len(row_of)
    n_cols = max([len(heads) + mlp] + [len(r) + (len(heads) if stage % 2 == 1 else 0) for stage, r in rows.items()])
    label = max(len(n) for n in used)
    radius = math.ceil(math.hypot(CHAR_EM * FONT * label / 2, FONT / 2)) + 2
    width = max(2 * SIDE + 2 * radius + (radius * 2 + GAP * radius) * max(n_cols - 1, 0),
                math.ceil(TITLE_EM * 12 * len(title)) + 2 * SIDE)
    col = (width - 2 * SIDE - 2 * radius) / max(n_cols - 1, 1)
    step = max(ROW, 2 * radius + 2 * CLEAR) + (2 * FONT if notes else 0)  # circles apart, room for the notes
    height = 2 * MARGIN + step * (n_rows - 1) + (24 if title else 0)
    y = lambda stage: height - MARGIN - step * row_of[stage]  # noqa: E731 - one line of geometry
    x = lambda c: SIDE + radius + col * c if n_cols > 1 else width / 2  # noqa: E731
    at: dict[str, tuple[float, float]] = {"embed": (x((n_cols - 1) / 2), y(0)),
                                          "logits": (x((n_cols - 1) / 2), y(2 * g.n_layers + 1))}
    for layer in range(g.n_layers):
        for h in heads:
            at[f"L{layer}.H{h}"] = (x(column[h]), y(2 * layer + 1))
        at[f"mlp{layer}"] = (x(n_cols - 1), y(2 * layer + 2))
    for stage, names in rows.items():
        first = len(heads) if stage % 2 == 1 else 0  # an attention row's features right of its heads
        for i, n in enumerate(names):
            at[n] = (x(first + i), y(stage))
    lines = []
    for s, target, e in ends:
        kind_ = g.receivers[int(g.receiver_index[e])].kind
        colour = COLOURS[SAME.get(kind_, kind_)]
        # from the sender's top into the receiver's bottom, queries left of keys, values right (no two coincide)
        side = {"q": -0.5, "v": 0.5}.get(kind_, 0.0)
        (x0, y0), (x1, y1) = (at[s][0], at[s][1] - radius), (at[target][0] + side * radius,
                                                             at[target][1] + math.sqrt(1 - side**2) * radius)
        others = torch.tensor([at[n] for n in used if n not in (s, target)], dtype=torch.float64).reshape(-1, 2)
        bend = _bends((x0, y0), (x1, y1), others, radius + CLEAR, width, col)
        stroke = max(MIN_WIDTH, MAX_WIDTH * float(w[e]) / top)
        lines.append(f'<path class="edge" data-edge="{escape(g.names[e])}" '
                     f'd="M{x0:.1f},{y0:.1f} Q{(x0 + x1) / 2 + bend:.1f},{(y0 + y1) / 2:.1f} {x1:.1f},{y1:.1f}" '
                     f'stroke="{colour}" stroke-width="{stroke:.2f}" fill="none" stroke-opacity="0.7">'
                     f'<title>{escape(g.names[e])}: {float(w[e]):.4g}</title></path>')
    nodes = []
    for name in sorted(used, key=lambda n: (at[n][1], at[n][0])):
        cx, cy = at[name]
        note = (notes or {}).get(name, "")
        style = 'fill="#eeeeee" stroke="#777777" stroke-dasharray="3,2"' if name in apart else \
            'fill="#ffffff" stroke="#333333"'
        tip = f"<title>{escape(name)}: {escape(note)}</title>" if note else ""
        nodes.append(f'<g class="node" data-node="{escape(name)}">{tip}<circle cx="{cx:.1f}" cy="{cy:.1f}" '
                     f'r="{radius}" {style} stroke-width="1.2"/><text x="{cx:.1f}" y="{cy + 0.35 * FONT:.1f}" '
                     f'font-size="{FONT}" text-anchor="middle" font-family="sans-serif">{escape(name)}</text>'
                     + (f'<text x="{cx:.1f}" y="{cy + radius + FONT:.1f}" font-size="{FONT - 2}" '
                        f'text-anchor="middle" font-family="sans-serif" fill="#555555">{escape(note[:24])}</text>'
                        if note else "") + "</g>")
    legend = [f'<text x="{SIDE + 70 * i}" y="{height - 12}" font-size="10" font-family="sans-serif" '
              f'fill="{c}">&#9644; {k}</text>' for i, (k, c) in enumerate(COLOURS.items())]
    head = (f'<text x="{width / 2:.1f}" y="18" font-size="12" text-anchor="middle" font-family="sans-serif">'
            f'{escape(title)}</text>') if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="circuit" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="#ffffff"/>\n{head}\n'
            + "\n".join(lines + nodes + legend) + "\n</svg>\n")


def _bends(start: tuple[float, float], end: tuple[float, float], others: torch.Tensor, clear: float,
           width: float, col: float) -> float:
    """How far (px, signed) the control point of the quadratic curve from ``start`` to ``end`` moves
    sideways: the least multiple of a quarter column whose curve stays ``clear`` px from the centres
    ``others`` ``[node, 2]`` (every node but its own two) and inside the picture's width; the curve
    furthest from them if none does.
    The further a curve reaches past nodes in its way, the more it bows, so curves between the
    same column's nodes nest instead of running over each other."""
    steps = torch.arange(0, 4 * int(width / col) + 1, dtype=torch.float64)
    bends = torch.stack([steps, -steps], 1).flatten()[1:] * col / 4  # 0, +q, -q, +2q, -2q, ...: [bend]
    t = torch.linspace(0, 1, 201, dtype=torch.float64)[:, None]  # [point, 1]
    p0, p1 = torch.tensor(start, dtype=torch.float64), torch.tensor(end, dtype=torch.float64)
    control = (p0 + p1) / 2 + torch.stack([bends, torch.zeros_like(bends)], 1)  # [bend, 2]
    points = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * control[:, None] + t**2 * p1  # [bend, point, 2]
    gap = torch.cdist(points, others[None].expand(len(bends), -1, -1)).amin((1, 2)) if len(others) else \
        torch.full((len(bends),), math.inf, dtype=torch.float64)
    inside = (points[..., 0].amin(1) >= 0) & (points[..., 0].amax(1) <= width)
    ok = ((gap >= clear) & inside).nonzero().flatten()
    return float(bends[ok[0]] if len(ok) else bends[torch.argmax(torch.where(inside, gap, -math.inf))])


def write_circuit_svg(circuit: Circuit, weights: torch.Tensor, path: str | Path, title: str = "",
                      notes: Mapping[str, str] | None = None) -> Path:
    """Write ``circuit_svg`` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(circuit_svg(circuit, weights, title, notes), encoding="utf-8")
    return path


def curve_svg(curve: FaithfulnessCurve, title: str = "") -> str:
    """The faithfulness curve as SVG text: one point per circuit size (``class="point"``, a tooltip
    with the fraction, the size and the faithfulness) joined by a line, the fraction of edges on a
    log axis with a tick at each power of 10, faithfulness on a linear axis that always spans 0 to 1
    (the corrupt run and the full model, the latter dashed) and any point beyond them by more than
    1e-6. Ticks carry ``class="x-tick"`` / ``"y-tick"`` and their labels the value, so the points
    can be read back."""
    ps, fs = curve.percentages, curve.faithfulness
    if not all(math.isfinite(f) for f in fs) or len(ps) != len(fs) or len(ps) < 2 or min(ps) <= 0:
        raise ValueError(f"a curve to draw needs two or more fractions > 0, each with a finite faithfulness; got "
                         f"{ps} and {fs}")
    width, height, left, right, top, bottom = 500, 320, 60, 20, 34 if title else 16, 50
    lo_x, hi_x = math.floor(math.log10(min(ps))), math.ceil(math.log10(max(ps)))
    hi_x = max(hi_x, lo_x + 1)
    low, high = min(fs), max(fs)  # float noise around 0 and 1 (a float32 circuit's 1e-7) does not widen the axis
    low, high = (low if low < -1e-6 else 0.0), (high if high > 1 + 1e-6 else 1.0)
    step = _nice_step((high - low) / 4)
    lo_y, hi_y = math.floor(low / step) * step, math.ceil(high / step) * step
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(p: float) -> float:
        return left + plot_w * (math.log10(p) - lo_x) / (hi_x - lo_x)

    def y(f: float) -> float:
        return top + plot_h * (hi_y - f) / (hi_y - lo_y)

    out = [f'<rect class="plot-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
           'stroke="#999999"/>']
    for k in range(lo_x, hi_x + 1):
        xx = x(10.0 ** k)
        out.append(f'<line class="x-tick" x1="{xx:.2f}" y1="{top}" x2="{xx:.2f}" y2="{top + plot_h + 5}" '
                   f'stroke="#e4e4e4"/><text class="x-tick-label" x="{xx:.2f}" y="{top + plot_h + 18}" '
                   f'font-size="10" text-anchor="middle" font-family="sans-serif">{10.0 ** k:g}</text>')
    for i in range(round((hi_y - lo_y) / step) + 1):
        value = lo_y + i * step
        yy = y(value)
        out.append(f'<line class="y-tick" x1="{left - 5}" y1="{yy:.2f}" x2="{left + plot_w}" y2="{yy:.2f}" '
                   f'stroke="#e4e4e4"/><text class="y-tick-label" x="{left - 8}" y="{yy + 3.5:.2f}" '
                   f'font-size="10" text-anchor="end" font-family="sans-serif">{value:.4g}</text>')
    for level, dash in ((1.0, ' stroke-dasharray="5,4"'), (0.0, "")):
        out.append(f'<line x1="{left}" y1="{y(level):.2f}" x2="{left + plot_w}" y2="{y(level):.2f}" '
                   f'stroke="#888888"{dash}/>')
    points = " ".join(f"{x(p):.2f},{y(f):.2f}" for p, f in zip(ps, fs))
    out.append(f'<polyline class="curve" points="{points}" fill="none" stroke="#d62728" stroke-width="1.8"/>')
    for p, size, kept, f in zip(ps, curve.sizes, curve.kept, fs):
        out.append(f'<circle class="point" cx="{x(p):.2f}" cy="{y(f):.2f}" r="3.5" fill="#d62728">'
                   f"<title>p = {p:g}: top {size} edges, {kept} kept after pruning; faithfulness {f:.4g}</title>"
                   "</circle>")
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" font-size="11" text-anchor="middle" '
               'font-family="sans-serif">fraction of edges kept (top p, log scale)</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" text-anchor="middle" font-family="sans-serif" '
               f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">faithfulness</text>')
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="20" font-size="12" text-anchor="middle" font-family="sans-serif">'
                   f"{escape(title)}</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="faithfulness-curve" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="#ffffff"/>\n'
            + "\n".join(out) + "\n</svg>\n")


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of 10 that is at least ``raw`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-12))

"""The circuit report (``write_circuit_report``) on the bundled IOI model: every number in its tables
against an independent computation (faithfulness in fresh contexts, the curve's areas by numpy,
the exact effects by exact edge patching one pair at a time), the circuit picture read back from its
SVG (one path per edge, widths by score, drawn upward by depth), the curve's plotted points read back
through the axis ticks, no external references, and the page as a real headless Chromium renders it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from atp_plugin import metrics
from atp_plugin.commands.usage import demo_task
from atp_plugin.edges import (
    MIB_PERCENTAGES,
    Circuit,
    attribute_edges,
    faithfulness,
    faithfulness_curve,
    top_circuit,
)
from atp_plugin.edges.svg import MAX_WIDTH, MIN_WIDTH, circuit_svg
from atp_plugin.report import write_circuit_report
from conftest import HAS_HOOKED, MISSING, VARIANTS, logit_diff_metric, make_model, make_pairs
from html_report import SVG, Dom, chromium, external_urls, svgs, tables

N, SIZE, VERIFIED = 4, 40, 6


@dataclasses.dataclass
class Case:
    model: object
    task: object
    result: object
    circuit: Circuit
    page: Path
    text: str


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    model, task, metric = demo_task(N, 0)
    result = attribute_edges(model, task.clean, task.corrupt, metric)
    circuit = top_circuit(result, SIZE)
    page = write_circuit_report(result, circuit, tmp_path_factory.mktemp("report") / "circuit.html",
                                curve=faithfulness_curve(result), verified=result.verify(VERIFIED),
                                model_label="demo", metric_label="logit difference", circuit_label="top 40")
    return Case(model, task, result, circuit, page, page.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expected_curve(case) -> list[tuple[float, int, int, float]]:
    """(p, size, kept, faithfulness) per MIB fraction, each faithfulness measured in a fresh context."""
    model, task = case.model, case.task
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    out = []
    for p in MIB_PERCENTAGES:
        size = int(p * case.result.graph.n_edges)
        circuit = top_circuit(case.result, size)
        out.append((p, size, circuit.n_edges, faithfulness(model, task.clean, task.corrupt, metric, circuit)))
    return out


def shown(cell: str, want: float, noise: float = 1e-6) -> bool:
    """``cell`` is ``want`` to the 4 significant digits the report prints (or within ``noise`` of it)."""
    return float(cell) == pytest.approx(want, rel=5.001e-4, abs=noise)


def test_summary_and_curve_tables_equal_independent_computations(case, expected_curve):
    model, task = case.model, case.task
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    found = tables(case.text)
    summary = dict(found["summary"])
    assert shown(summary["faithfulness"], faithfulness(model, task.clean, task.corrupt, metric, case.circuit))
    assert summary["circuit"] == f"{len(case.circuit.edges())} edges (top 40)"
    assert summary["edges scored"] == "479" and summary["pairs"] == str(N)

    header, *rows = found["curve-points"]
    assert header == ["p", "top n edges", "kept after pruning", "faithfulness"]
    assert len(rows) == len(expected_curve) == 10
    for (p, size, kept, f), row in zip(expected_curve, rows):
        assert float(row[0]) == p and int(row[1]) == size and int(row[2]) == kept
        assert shown(row[3], f)
    ps, fs = [c[0] for c in expected_curve], np.array([c[3] for c in expected_curve])
    numbers = dict(found["curve-summary"])
    assert shown(numbers["CPR (area under the curve)"], float(np.trapezoid(fs, ps)))
    assert shown(numbers["CMD (area between the curve and 1)"], float(np.trapezoid(np.abs(1 - fs), ps)))
    assert shown(numbers["average faithfulness"], float(fs.mean()))
    run = sum(1 for c in expected_curve if c[2])  # clean, corrupt, one per size but where pruning left no edge
    assert int(numbers["forward passes (of one prompt)"]) == N * (2 + run)


def test_top_edges_table_holds_scores_and_exact_effects(case):
    """Names and estimates straight from the score tensors; the verified effects against exact edge
    patching (method "ap") run on one pair at a time: the mean of I and the mean of |I|."""
    result, model, task = case.result, case.model, case.task
    header, *rows = tables(case.text)["top-edges"]
    assert header == ["edge", "score", "signed estimate", "verified mean effect", "verified mean |effect|",
                      "in circuit"]
    order = torch.argsort(result.scores, descending=True, stable=True)[:VERIFIED].tolist()
    assert [r[0] for r in rows] == [result.graph.names[e] for e in order]
    per_pair = []
    for i in range(N):
        metric = metrics.logit_diff(metrics.token_ids(model, task.answers[i:i + 1]),
                                    metrics.token_ids(model, task.wrongs[i:i + 1]))
        per_pair.append(attribute_edges(model, task.clean[i:i + 1], task.corrupt[i:i + 1], metric,
                                        method="ap").signed.double())
    exact = torch.stack(per_pair)  # [pair, edge]: I of patching each edge alone, at every position
    kept = set(case.circuit.edges())
    for e, row in zip(order, rows):
        assert shown(row[1], float(result.scores[e])) and shown(row[2], float(result.signed[e]))
        assert shown(row[3], float(exact[:, e].mean()), noise=1e-5)
        assert shown(row[4], float(exact[:, e].abs().mean()), noise=1e-5)
        assert row[5] == ("yes" if result.graph.names[e] in kept else "no")
    assert {r[5] for r in rows} == {"yes"}  # the top edges of this model all survive pruning


def _path_ends(d: str) -> tuple[tuple[float, float], tuple[float, float]]:
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return (numbers[0], numbers[1]), (numbers[-2], numbers[-1])


def test_circuit_picture_has_one_path_per_edge_widths_by_score(case):
    result, circuit = case.result, case.circuit
    assert result.graph.n_kv == result.graph.n_heads  # one path per edge (no key/value shared by heads)
    root = svgs(case.text)["circuit"]
    paths = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    names = [p.get("data-edge") for p in paths]
    assert sorted(names) == sorted(circuit.edges()) and len(paths) == circuit.n_edges
    score = {n: float(result.scores[result.graph.edge_of[n]]) for n in names}
    width = {p.get("data-edge"): float(p.get("stroke-width")) for p in paths}
    ranked = sorted(names, key=lambda n: -score[n])
    widths = [width[n] for n in ranked]
    assert widths == sorted(widths, reverse=True) and widths[0] == MAX_WIDTH
    assert widths[0] > 3 * widths[-1]  # the scores differ, and the picture shows it
    top = score[ranked[0]]
    for n in names:  # proportional to the score, floored at MIN_WIDTH, written to 0.01 px
        assert width[n] == pytest.approx(max(MIN_WIDTH, MAX_WIDTH * score[n] / top), abs=0.0051)
    for p in paths:  # layered by depth: every edge runs up, from its sender to a later layer
        (_, y0), (_, y1) = _path_ends(p.get("d"))
        assert y0 > y1, p.get("data-edge")


def _axis(root: ET.Element, axis: str, log: bool) -> tuple[float, float]:
    """(offset, slope) of pixel = offset + slope * value (log10 value on a log axis), fitted to the
    tick marks and their labels; every tick must lie on it."""
    at = "x1" if axis == "x" else "y1"
    marks = [float(t.get(at)) for t in root.iter(f"{SVG}line") if t.get("class") == f"{axis}-tick"]
    labels = [float(t.text) for t in root.iter(f"{SVG}text") if t.get("class") == f"{axis}-tick-label"]
    assert len(marks) == len(labels) >= 2
    values = [math.log10(v) for v in labels] if log else labels
    slope = (marks[-1] - marks[0]) / (values[-1] - values[0])
    offset = marks[0] - slope * values[0]
    for v, m in zip(values, marks):
        assert m == pytest.approx(offset + slope * v, abs=0.02)
    return offset, slope


def test_curve_points_read_back_through_the_axes_equal_the_curve(case, expected_curve):
    root = svgs(case.text)["faithfulness-curve"]
    x0, dx = _axis(root, "x", log=True)
    y0, dy = _axis(root, "y", log=False)
    labels = [float(t.text) for t in root.iter(f"{SVG}text") if t.get("class") == "y-tick-label"]
    assert min(labels) == 0 and max(labels) == 1  # the corrupt run and the full model, nothing beyond
    points = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(f"{SVG}circle") if c.get("class") == "point"]
    assert len(points) == len(expected_curve)
    for (cx, cy), (p, _, _, f) in zip(points, expected_curve):
        assert (cx - x0) / dx == pytest.approx(math.log10(p), abs=1e-3)
        assert (cy - y0) / dy == pytest.approx(f, abs=1e-3)
    (line,) = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == "curve"]
    assert [tuple(float(v) for v in xy.split(",")) for xy in line.get("points").split()] == points


def test_the_page_fetches_nothing(case):
    assert external_urls(case.text) == []
    assert "<script" not in case.text


def test_the_circuit_report_renders_in_headless_chromium(case, tmp_path):
    done = chromium("--dump-dom", case.page.as_uri(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Dom(done.stdout)
    assert [a.get("id") for t, a in dom.tags if t == "h2"] == ["circuit", "curve", "top-edges"]
    assert len(dom.find("path", "edge")) == case.circuit.n_edges
    assert len(dom.find("circle", "point")) == len(MIB_PERCENTAGES)
    assert len(dom.find("tr", "curve-row")) == len(MIB_PERCENTAGES) and len(dom.find("tr", "edge-row")) == VERIFIED
    assert external_urls(done.stdout) == []

    shot = tmp_path / "circuit.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,2000", case.page.as_uri(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0.2  # not grey: the circuit's edges and the curve
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.35)  # the curve's #d62728
    assert (coloured & ~red).sum() > 2000 and red.sum() > 500  # about 5000 and 1100 drawn


def test_bad_input_is_refused_before_any_work(case, tmp_path):
    result, circuit = case.result, case.circuit
    curve = faithfulness_curve(result, (0.1, 1.0))
    path = tmp_path / "bad.html"
    before = result.context.forward_passes
    g = result.graph
    other = dataclasses.replace(g, senders=g.senders[:-1])  # the graph without mlp3
    cases = [
        (dict(circuit=Circuit(other, torch.ones(other.n_edges, dtype=torch.bool))), ValueError, "another model"),
        (dict(circuit=Circuit(g, torch.ones(g.n_edges, 3, dtype=torch.bool))), ValueError, "the circuit keeps"),
        (dict(curve=dataclasses.replace(curve, sizes=(4, 400))), ValueError, "not int"),
        (dict(verified=result.top(3)), ValueError, "lacks the columns"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(result="scores"), TypeError, "EdgeResult"),
    ]
    for change, error, message in cases:
        args = dict(result=result, circuit=circuit, path=path, curve=curve) | change
        with pytest.raises(error, match=message):
            write_circuit_report(**args)
    assert result.context.forward_passes == before and not path.exists()


@pytest.mark.skipif(not HAS_HOOKED, reason=MISSING["hooked"] or "")
def test_per_position_and_grouped_query_pictures():
    """Under grouped-query attention an edge into a shared key or value reaches every query head of
    its group (one path each); per position, an edge's width is its score summed over the
    positions the circuit keeps it at; a position-free circuit sums over every position."""
    model, (clean, corrupt), metric = make_model(0, **VARIANTS["gqa"]), make_pairs(3, 5), logit_diff_metric(3)
    result = attribute_edges(model, clean, corrupt, metric, per_position=True)
    g = result.graph
    group = g.n_heads // g.n_kv
    assert group == 2
    for circuit in (top_circuit(result, 30), Circuit.from_names(g, [g.names[e] for e in range(0, g.n_edges, 7)])):
        root = ET.fromstring(circuit_svg(circuit, result.scores))
        paths = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
        names = circuit.edges()
        for n in names:
            kind = g.receivers[int(g.receiver_index[g.edge_of[n]])].kind
            assert sum(p.get("data-edge") == n for p in paths) == (group if kind in ("k", "v") else 1), n
        weight = {}
        for n in names:
            e = g.edge_of[n]
            at = range(result.scores.shape[1])
            weight[n] = sum(float(result.scores[e, t]) for t in at if not circuit.per_position or circuit.keep[e, t])
        top = max(weight.values())
        for p in paths:
            want = max(MIN_WIDTH, MAX_WIDTH * weight[p.get("data-edge")] / top)
            assert float(p.get("stroke-width")) == pytest.approx(want, abs=0.0051)
    with pytest.raises(ValueError, match="same shape"):
        circuit_svg(top_circuit(result, 30), result.scores[:, :2])
    with pytest.raises(ValueError, match="edges"):
        circuit_svg(top_circuit(result, 30), result.scores[:5])

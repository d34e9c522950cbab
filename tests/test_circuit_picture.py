"""The circuit picture's geometry, read back from the SVG: every label fits inside its circle (its
extent measured with matplotlib's sans-serif font, DejaVu Sans), no two circles overlap, no edge
runs along another edge or (in pictures of a few layers) under a node it does not join, and the
drawing fills the picture's width (the title's, when that is wider). On the demo model's IOI
circuits and on a 12-layer, 12-head graph. How the picture renders is test_circuit_report.py's
Chromium screenshot test."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextPath

from atp_plugin import metrics
from atp_plugin.commands.usage import demo_task
from atp_plugin.edges import Circuit, attribute_edges, top_circuit
from atp_plugin.edges.svg import circuit_svg
from hf_models import load_bridge, save_gpt2
from html_report import SVG

TITLE = "bundled IOI demo model, 32 held-out pairs: 40 edges, faithfulness 0.714"


def text_box(text: ET.Element) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) of a middle-anchored label in sans-serif at its font size."""
    size = float(text.get("font-size"))
    ext = TextPath((0, 0), text.text, size=size, prop=FontProperties(family=["sans-serif"])).get_extents()
    x, y = float(text.get("x")), float(text.get("y"))  # y is the baseline; the path's y grows upwards
    return x - ext.width / 2, x + ext.width / 2, y - ext.y1, y - ext.y0


def curve(d: str) -> np.ndarray:
    """Points along a path ``M x0,y0 Q cx,cy x1,y1`` ``[point, 2]``."""
    p0, c, p1 = np.array([float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]).reshape(3, 2)
    t = np.linspace(0, 1, 201)[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * c + t**2 * p1


def check_geometry(svg: str, *, clear_of_nodes: bool = True) -> ET.Element:
    """Check the picture; ``clear_of_nodes``: also that no edge runs under a node it does not join
    (quadratic curves find such a way in pictures of a few layers, not always through rows of many heads)."""
    root = ET.fromstring(svg)
    width = float(root.get("width"))
    circles = {(float(c.get("cx")), float(c.get("cy"))): float(c.get("r")) for c in root.iter(f"{SVG}circle")}
    centres = np.array(list(circles))
    labels = [t for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "middle" and t.get("y") != "18"]
    assert len(labels) == len(circles) >= 3
    for text in labels:  # each label's four corners inside the circle it is centred on
        left, right, top, bottom = text_box(text)
        cx = float(text.get("x"))
        (centre, r), = [(c, r) for c, r in circles.items() if c[0] == cx and top < c[1] < bottom]
        for x in (left, right):
            for y in (top, bottom):
                assert math.dist((x, y), centre) <= r, (text.text, (x, y), centre, r)
    for i, (a, ra) in enumerate(circles.items()):  # circles apart
        for b, rb in list(circles.items())[i + 1:]:
            assert math.dist(a, b) > ra + rb, (a, b)
    paths = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    assert len({p.get("d") for p in paths}) == len(paths)  # no edge drawn over another
    xs = []
    for p in paths:
        points = curve(p.get("d"))
        xs += [points[:, 0].min(), points[:, 0].max()]
        ends = [np.argmin(np.linalg.norm(centres - points[i], axis=1)) for i in (0, -1)]  # the circles it joins
        others = np.delete(centres, ends, axis=0)
        radii = np.delete(np.array(list(circles.values())), ends)
        gaps = np.linalg.norm(points[:, None] - others[None], axis=2) - radii[None]
        assert gaps.min() > 0 or not clear_of_nodes, f"{p.get('data-edge')} runs under a node it does not join"
    left = min(min(c[0] - r for c, r in circles.items()), *xs)
    right = max(max(c[0] + r for c, r in circles.items()), *xs)
    assert left >= 0 and right <= width and right - left >= 0.85 * width, (left, right, width)
    for text in root.iter(f"{SVG}text"):  # the title inside the picture too
        if text.get("text-anchor") == "middle":
            start, end, _, _ = text_box(text)
            assert start >= 0 and end <= width, text.text
    return root


@pytest.fixture(scope="module")
def demo():
    model, task, metric = demo_task(16, 0)
    return attribute_edges(model, task.clean, task.corrupt, metric)


@pytest.mark.parametrize("size, title", [(40, TITLE), (40, ""), (120, ""), (10, TITLE)])
def test_the_demo_circuit(demo, size, title):
    circuit = top_circuit(demo, size)
    root = check_geometry(circuit_svg(circuit, demo.scores, title))
    assert len([p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]) == len(circuit)


def test_the_full_demo_graph(demo):
    full = Circuit(demo.graph, torch.ones(demo.graph.n_edges, dtype=torch.bool))
    check_geometry(circuit_svg(full, demo.scores), clear_of_nodes=False)


def test_twelve_layers_of_twelve_heads(tmp_path):
    model = load_bridge(save_gpt2(tmp_path, n_layer=12, n_embd=48, n_head=12))
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(2, 40, (2, 6), generator=g), torch.randint(2, 40, (2, 6), generator=g)
    result = attribute_edges(model, clean, corrupt, metrics.logit_diff([3, 4], [5, 6]))
    svg = circuit_svg(top_circuit(result, 150), result.scores, "a 12-layer model")
    root = check_geometry(svg, clear_of_nodes=False)
    assert any(re.fullmatch(r"L\d+\.H1\d", t.text or "") for t in root.iter(f"{SVG}text"))  # long labels fit too

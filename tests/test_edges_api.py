"""The edge API as a new user meets it, on the float32 demo model (TransformerLens 3 and 4): it is
exported beside ``attribute``, a ``Circuit`` prints short and behaves as a container of edge names,
and the empty circuit's faithfulness is exactly 0 (the full graph's exactly 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import atp_plugin
from atp_plugin.commands.usage import demo_task
from atp_plugin.edges import Circuit, attribute_edges, faithfulness, faithfulness_of, top_circuit


@pytest.fixture(scope="module")
def demo():
    model, task, metric = demo_task(4, 0)
    return model, task, metric, attribute_edges(model, task.clean, task.corrupt, metric)


def test_the_edge_api_is_exported_beside_attribute():
    done = subprocess.run([sys.executable, "-c", "import atp_plugin; print(atp_plugin.edges.faithfulness.__name__)"],
                          capture_output=True, text=True)  # a fresh interpreter: nothing imported it before
    assert done.returncode == 0 and done.stdout.strip() == "faithfulness", done.stderr
    assert {"edges", "attribute_edges"} <= set(atp_plugin.__all__)
    assert atp_plugin.attribute_edges is atp_plugin.edges.attribute_edges
    assert "attribute_edges(" in atp_plugin.__doc__ and "faithfulness" in atp_plugin.__doc__
    for name in atp_plugin.edges.__all__:
        assert getattr(atp_plugin.edges, name) is not None


def test_a_circuit_prints_short_and_is_a_container_of_edge_names(demo):
    *_, result = demo
    circuit = top_circuit(result, 40)
    names = circuit.edges()
    assert len(circuit) == len(names) == circuit.n_edges > 3
    assert list(circuit) == names and all(n in circuit for n in names)
    outside = next(n for n in result.graph.names if n not in names)
    assert outside not in circuit and "no such edge" not in circuit and 3 not in circuit
    text = repr(circuit)
    assert len(text) < 200 and str(circuit) == text
    assert text == (f"Circuit({len(names)} of {result.graph.n_edges} edges, each at every position: "
                    f"{names[0]!r}, {names[1]!r}, {names[2]!r}, ... {len(names) - 3} more)")
    empty = Circuit(result.graph, torch.zeros(result.graph.n_edges, dtype=torch.bool))
    assert repr(empty) == f"Circuit(0 of {result.graph.n_edges} edges, each at every position)"
    assert len(empty) == 0 and list(empty) == []


def test_a_per_position_circuit_counts_each_edge_once(demo):
    *_, result = demo
    keep = torch.zeros(result.graph.n_edges, 15, dtype=torch.bool)
    keep[0, [3, 4]] = keep[5, 7] = True
    circuit = Circuit(result.graph, keep)
    assert len(circuit) == 2 and circuit.n_edges == 3 and list(circuit) == [result.graph.names[0],
                                                                             result.graph.names[5]]
    assert repr(circuit) == (f"Circuit(2 of {result.graph.n_edges} edges at 3 edge-positions (15 positions): "
                             f"{result.graph.names[0]!r}, {result.graph.names[5]!r})")


def test_empty_and_full_circuits_are_exactly_0_and_1_in_float32(demo):
    model, task, metric, result = demo
    assert next(model.parameters()).dtype == torch.float32
    full = Circuit(result.graph, torch.ones(result.graph.n_edges, dtype=torch.bool))
    empty = Circuit(result.graph, torch.zeros(result.graph.n_edges, dtype=torch.bool))
    assert faithfulness(model, task.clean, task.corrupt, metric, []) == 0.0
    before = result.context.forward_passes
    assert faithfulness_of(result, [empty, full, top_circuit(result, 0)]) == [0.0, 1.0, 0.0]
    assert result.context.forward_passes - before == 3 * 4  # clean, corrupt and the full graph's run per pair

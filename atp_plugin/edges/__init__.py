"""Edges: attribution patching for the connections between components (EAP, EAP with the QK fix,
EAP-IG, exact edge patching), circuits, their faithfulness and cost-of-verification curves. See
``graph`` for the edge graph and its naming; edge methods register through
``atp_register_edge_methods`` (``methods``)."""

from .attribute import attribute_edges
from .circuit import (
    EDGE_CLASSES,
    MIB_PERCENTAGES,
    Circuit,
    FaithfulnessCurve,
    faithfulness,
    faithfulness_by_class,
    faithfulness_curve,
    faithfulness_of,
    left_out,
    pruned,
    threshold_circuit,
    top_circuit,
)
from .evaluate import evaluate_edges
from .features import activating_tokens
from .graph import Graph, Receiver, Sender
from .result import EdgeResult

__all__ = ["EDGE_CLASSES", "MIB_PERCENTAGES", "Circuit", "EdgeResult", "FaithfulnessCurve", "Graph", "Receiver",
           "Sender", "activating_tokens", "attribute_edges", "evaluate_edges", "faithfulness", "faithfulness_by_class",
           "faithfulness_curve", "faithfulness_of", "left_out", "pruned", "threshold_circuit", "top_circuit"]

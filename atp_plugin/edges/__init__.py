"""Edges: attribution patching for the connections between components (EAP, EAP with the QK fix,
EAP-IG, exact edge patching), circuits and their faithfulness. See ``graph`` for the edge graph
and its naming."""

from .attribute import METHODS, attribute_edges
from .graph import Graph, Receiver, Sender
from .result import EdgeResult

__all__ = ["METHODS", "EdgeResult", "Graph", "Receiver", "Sender", "attribute_edges"]

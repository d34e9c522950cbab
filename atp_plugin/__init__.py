"""atp-plugin: AtP* (Kramár et al. 2024) for TransformerLens and SAE-Lens, as a pluggy plugin.

``attribute(model, clean, corrupt, metric)`` ranks attention heads, their queries/keys/values,
MLP neurons, residual vectors, SAE features or your own node types by their effect on a metric,
in a few forward and backward passes instead of one patched run per node.

``attribute_edges(model, clean, corrupt, metric)`` scores the edges between components instead (EAP,
its QK fix, EAP-IG, exact edge patching); ``edges`` holds the rest of the edge API: circuits
(``top_circuit``, ``threshold_circuit``), their ``faithfulness`` and MIB's ``faithfulness_curve``.
"""

from . import edges, metrics
from .adapters import NodeAdapter
from .attribution import attribute
from .bound import FalseNegativeBound, false_negative_bound
from .edges import attribute_edges
from .engine.stream import PairStream
from .estimate import Estimate, estimate, estimate_edges
from .evaluate import Evaluation, evaluate
from .hookspecs import hookimpl
from .result import AttributionResult
from .verify import verify

__all__ = ["attribute", "attribute_edges", "AttributionResult", "Estimate", "Evaluation", "FalseNegativeBound",
           "NodeAdapter", "PairStream", "edges", "estimate", "estimate_edges", "evaluate", "false_negative_bound",
           "hookimpl", "metrics", "verify"]
__version__ = "0.1.0"

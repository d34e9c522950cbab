"""atp-plugin: AtP* (Kramár et al. 2024) for TransformerLens and SAE-Lens, as a pluggy plugin.

``attribute(model, clean, corrupt, metric)`` ranks attention heads, their queries/keys/values,
MLP neurons, residual vectors, SAE features or your own node types by their effect on a metric,
in a few forward and backward passes instead of one patched run per node.
"""

from . import metrics
from .adapters import NodeAdapter
from .attribution import attribute
from .bound import FalseNegativeBound, false_negative_bound
from .engine.stream import PairStream
from .estimate import Estimate, estimate
from .evaluate import Evaluation, evaluate
from .hookspecs import hookimpl
from .result import AttributionResult
from .verify import verify

__all__ = ["attribute", "AttributionResult", "Estimate", "Evaluation", "FalseNegativeBound", "NodeAdapter",
           "PairStream", "estimate", "evaluate", "false_negative_bound", "hookimpl", "metrics", "verify"]
__version__ = "0.1.0"

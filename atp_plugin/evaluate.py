"""Cost-of-verification curves (docs/method.md, "Cost of verification"): how the paper compares methods.

A method ranks the nodes; a user then verifies nodes by exact patching in that order. The cost to
find the true top-x nodes is the method's own cost plus the cost of verifying nodes down to the
last of the true top x in the method's order. Ground truth is exhaustive patching (``ap``); an
oracle (the true order, free) gives the diagonal.

Cost unit: forward passes of one prompt, as ``Engine.forward_passes`` counts them for every
backend, plus ``BACKWARD_COST`` = 2 forward passes per backward pass of one prompt
(``Engine.backward_passes``; GradDrop's partial backward passes count by the fraction of layers
they run through). Verifying one node costs one patched forward pass per pair (``n_pairs``); the
clean and corrupt runs verification shares are not charged. Nodes the method scores equally are
verified in a random order, the same for every method (``seed``); NaN scores rank last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .adapters import NodeAdapter
from .attribution import DEFAULT_NODES, attribute
from .backends import Backend
from .backends.builtin import FEW_LAYERS
from .engine import Metric
from .result import AttributionResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BACKWARD_COST = 2.0  # forward passes per backward pass
DEFAULT_METHODS = ("atp", "atp+qk", "atp*", "subsampling", "hierarchical", "blocks")
GROUND_TRUTH = "ap"


@dataclass
class Evaluation:
    """Cost-of-verification curves.

    ``curves``: index ``x`` = 1..top_x (true top nodes found), one column per method plus
    ``"oracle"``: forward passes spent to have verified all of the true top x. ``method_cost``:
    each method's own cost (forward passes, backward passes counted as ``BACKWARD_COST``).
    ``ranks``: per method, the 1-based rank in its order of each of the true top-x nodes.
    ``truth``: the ``ap`` result the curves are measured against. With ``n_layers`` <= 3 the plot
    notes that GradDrop degenerates (docs/method.md, "GradDrop").
    """

    curves: pd.DataFrame
    method_cost: dict[str, float]
    ranks: pd.DataFrame
    truth: AttributionResult
    n_pairs: int
    n_nodes: int
    n_layers: int

    def table(self) -> pd.DataFrame:
        """The curves with each method's own cost as a first row ``x = 0``."""
        own = pd.DataFrame([{**self.method_cost, "oracle": 0.0}], index=pd.Index([0], name="x"))
        return pd.concat([own, self.curves])

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Write the curves (``figure``) as a PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure(title=title).savefig(path, dpi=120)
        return path

    def figure(self, *, title: str | None = None) -> Figure:
        """The curves drawn: x = true top nodes found (a count: whole-number ticks), y = cost (log scale)."""
        from matplotlib.figure import Figure  # drawn without pyplot: matplotlib's backend is left as it is
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(8.0, 4.6))
        ax = fig.add_subplot()
        x = self.curves.index.to_numpy()
        for method in self.curves.columns:
            style: dict[str, Any] = dict(color="black", linestyle="--") if method == "oracle" else {}
            ax.plot(x, self.curves[method].to_numpy(), marker="o", markersize=3, label=method, **style)
        ax.set_yscale("log")
        ax.set_xlabel("true top nodes found (x)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cost: forward passes (backward = 2)")
        ax.set_title(title or f"cost of verification: {self.n_nodes} nodes, {self.n_pairs} pairs", fontsize=10)
        if self.n_layers <= FEW_LAYERS:
            fig.text(0.01, 0.01, f"{self.n_layers} layers: GradDrop (atp*, atp+gd) degenerates; nodes acting only "
                     "through later layers can score near 0", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        return fig


def cost_of(result: AttributionResult) -> float:
    """A result's own cost: forward passes + ``BACKWARD_COST`` x backward passes of its engine."""
    engine = result.require_engine("the cost of a result")
    return engine.forward_passes + BACKWARD_COST * engine.backward_passes


def rank_order(scores: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Node indices by descending score, ties by ``tiebreak`` (a permutation), NaN last."""
    key = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((tiebreak, -key))


def evaluate(model: Any, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str],
             metric: Metric, *, nodes: str | NodeAdapter | Sequence[str | NodeAdapter] = DEFAULT_NODES,
             methods: str | Backend | Sequence[str | Backend] = DEFAULT_METHODS,
             top_x: int = 20, seed: int = 0, batch_size: int | None = None, patch_batch_size: int | None = None,
             max_memory: float | None = None, progress: bool | None = None) -> Evaluation:
    """Cost-of-verification curves of ``methods`` (registered backend names or backend instances,
    or one of them) on one model and task, against exhaustive patching.

    Runs ``ap`` once for the ground truth (so it is slow where ``ap`` is), then every method.
    The true top-x nodes are the ``top_x`` nodes with the largest |mean effect|. ``batch_size``,
    ``patch_batch_size``, ``max_memory`` and ``progress`` go to every ``attribute()`` call.
    """
    # one method (a name or a backend instance) is a list of one, not a string's letters
    chosen: list[str | Backend] = (
        [methods] if isinstance(methods, str) or not isinstance(methods, Iterable) else list(methods))
    if not chosen:
        raise ValueError("methods is empty; name at least one backend, e.g. methods=['atp*']")
    nameless = [m for m in chosen if not isinstance(m if isinstance(m, str) else getattr(m, "name", None), str)]
    if nameless:
        raise TypeError(f"methods must be backend names or backends with a name, got {nameless[0]!r}")
    names = [m if isinstance(m, str) else m.name for m in chosen]
    if len(set(names)) != len(names) or "oracle" in names:
        raise ValueError(f"methods must have distinct names other than 'oracle', got {names}")
    if top_x < 1:
        raise ValueError(f"top_x must be at least 1, got {top_x}")
    options: dict[str, Any] = dict(nodes=nodes, batch_size=batch_size, patch_batch_size=patch_batch_size,
                                   max_memory=max_memory, progress=progress)
    results = {names[0]: attribute(model, clean, corrupt, metric, method=chosen[0], **options)}
    first = results[names[0]].to_frame()  # the node count, known before the slow ground truth runs
    n_nodes = len(first)
    if top_x > n_nodes:
        raise ValueError(f"top_x={top_x} exceeds the {n_nodes} nodes of nodes={nodes!r}; lower top_x")
    truth = results.get(GROUND_TRUTH) or attribute(model, clean, corrupt, metric, method=GROUND_TRUTH, **options)
    frame = truth.to_frame()
    tiebreak = np.random.default_rng(seed).permutation(n_nodes)
    true_order = rank_order(frame["score"].to_numpy(), tiebreak)[:top_x]  # indices of the true top x

    for name, m in zip(names[1:], chosen[1:]):
        results[name] = truth if name == GROUND_TRUTH else attribute(model, clean, corrupt, metric, method=m, **options)
    n_pairs = truth.n_pairs
    x = np.arange(1, top_x + 1)
    curves: dict[str, np.ndarray] = {}
    ranks: dict[str, np.ndarray] = {}
    own: dict[str, float] = {}
    for name, result in results.items():
        order = rank_order(result.to_frame()["score"].to_numpy(), tiebreak)
        position = np.empty(n_nodes, dtype=np.int64)
        position[order] = np.arange(1, n_nodes + 1)  # node -> its 1-based rank
        ranks[name] = position[true_order]
        own[name] = cost_of(result)
        curves[name] = own[name] + n_pairs * np.maximum.accumulate(ranks[name])
    curves["oracle"] = (n_pairs * x).astype(float)
    index = pd.Index(x, name="x")
    node_labels = frame["node"].to_numpy()[true_order]
    return Evaluation(pd.DataFrame(curves, index=index), own,
                      pd.DataFrame(ranks, index=pd.Index(node_labels, name="node")), truth, n_pairs, n_nodes,
                      truth.require_engine("evaluate()").host.n_layers)

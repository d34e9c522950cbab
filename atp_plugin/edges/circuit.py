"""Circuits: sets of edges chosen from edge scores, dangling edges pruned, and their faithfulness.

Faithfulness of circuit C: (L(C) - L(corrupt)) / (L(clean) - L(corrupt)), each a mean over pairs,
where L(C) runs the clean prompts with every edge NOT in C patched (its sender's corrupt write fed
to that receiver only). The full graph gives L(clean), 1; the empty circuit feeds every receiver the
corrupt residual, L(corrupt), 0. Both are exact, in any dtype: the full graph's run patches nothing
and the empty circuit is not run. The curve over circuit sizes and its summary numbers follow the
MIB benchmark's circuit-localization track: faithfulness of the top n = int(p * n_edges) edges
(pruned) at p in ``MIB_PERCENTAGES``; CPR = the area under the curve, CMD = the area between the
curve and 1 (``|1 - f|``), both by the trapezoidal rule over p.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import pandas as pd
import torch

from ..attribution import eval_mode
from ..engine.pairs import Pairs, make_pairs
from .attribute import make_context
from .context import Context
from .features import kept_of
from .graph import Graph
from .groups import Writes
from .result import EdgeResult

#: what an edge outside a circuit carries: its sender's corrupt write, or its mean write over calibration prompts
Ablation = Literal["corrupt", "mean"]

MIB_PERCENTAGES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Circuit:
    """The edges kept: ``keep`` ``[edge]`` bool (each edge at every position) or ``[edge, pos]``.

    A container of edge names: ``len(circuit)``, ``for name in circuit`` and ``"embed -> mlp0" in
    circuit`` count an edge kept at any position once (``n_edges`` counts a per-position circuit's
    edge-positions)."""

    graph: Graph
    keep: torch.Tensor

    @property
    def per_position(self) -> bool:
        return self.keep.ndim == 2

    @property
    def n_edges(self) -> int:
        return int(self.keep.sum())

    def edges(self) -> list[str]:
        """Names of the edges kept (at some position), in the graph's order; also ``list(circuit)``."""
        kept = self.keep.any(-1) if self.per_position else self.keep
        return [self.graph.names[i] for i in kept.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return int((self.keep.any(-1) if self.per_position else self.keep).sum())

    def __iter__(self) -> Iterator[str]:
        return iter(self.edges())

    def __contains__(self, name: object) -> bool:
        edge = self.graph.edge_of.get(name) if isinstance(name, str) else None
        return edge is not None and bool(self.keep[edge].any())

    def __repr__(self) -> str:
        """Its size and first few edges, not the graph and mask it holds (thousands of characters)."""
        names, shown = self.edges(), 3
        where = (f" at {self.n_edges} edge-positions ({self.keep.shape[1]} positions)" if self.per_position
                 else ", each at every position")
        listed = ", ".join(repr(n) for n in names[:shown]) + (f", ... {len(names) - shown} more"
                                                              if len(names) > shown else "")
        return f"Circuit({len(names)} of {self.graph.n_edges} edges{where}" + (f": {listed})" if names else ")")

    @classmethod
    def from_names(cls, graph: Graph, names: Sequence[str]) -> "Circuit":
        unknown = [n for n in names if n not in graph.edge_of]
        if unknown:
            raise ValueError(f"{len(unknown)} edge name(s) are not in this model's graph, e.g. {unknown[0]!r}; "
                             "names look like 'L1.H2 -> L3.H0.q', 'embed -> mlp2', 'mlp1 -> logits'")
        keep = torch.zeros(graph.n_edges, dtype=torch.bool)
        keep[[graph.edge_of[n] for n in names]] = True
        return cls(graph, keep)


def top_circuit(result: EdgeResult, n: int, *, prune: bool = True, rank: str = "abs") -> Circuit:
    """The ``n`` highest-scoring edges (edge-positions with a per-position result), then pruned.

    ``rank="abs"`` ranks by ``result.scores``; ``"signed"`` by how much patching the edge lowers
    the metric (``-result.signed``; MIB ranks by signed scores for CPR)."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (a number of edges), got {n!r}")
    key = _ranking(result, rank).reshape(-1)
    keep = torch.zeros(key.numel(), dtype=torch.bool)
    keep[torch.argsort(key, descending=True, stable=True)[:n]] = True
    circuit = Circuit(result.graph, keep.reshape(result.scores.shape))
    return pruned(circuit) if prune else circuit


def threshold_circuit(result: EdgeResult, threshold: float, *, prune: bool = True, rank: str = "abs") -> Circuit:
    """Every edge (edge-position) whose score is at least ``threshold``, then pruned."""
    if not isinstance(threshold, numbers.Real) or threshold != threshold:
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    circuit = Circuit(result.graph, _ranking(result, rank) >= threshold)
    return pruned(circuit) if prune else circuit


def _ranking(result: EdgeResult, rank: str) -> torch.Tensor:
    if rank == "abs":
        return result.scores
    if rank == "signed":
        return -result.signed
    raise ValueError(f"rank must be 'abs' or 'signed', got {rank!r}")


def pruned(circuit: Circuit) -> Circuit:
    """``circuit`` without dangling edges: an edge stays when its sender is reached from the input
    along kept edges and its receiver's component reaches the logits along kept edges.

    A head is reached at position t through a kept edge into its query at t or into its key or
    value at any s <= t (attention moves information forward); its key/value input at s matters if
    its output at any t >= s does. Position-free circuits are the one-position case. One forward and
    one backward sweep in stage order suffice: a dropped edge never made anything reached or useful
    that keeps an edge of its own.
    """
    g, keep = circuit.graph, circuit.keep
    k = keep if circuit.per_position else keep[:, None]  # [edge, pos]
    t = k.shape[1]
    s_idx, r_idx = g.sender_index, g.receiver_index
    n_s, n_r = len(g.senders), len(g.receivers)
    reached = torch.zeros(n_s, t, dtype=torch.bool)
    useful = torch.zeros(n_r, t, dtype=torch.bool)
    stages = sorted({s.stage for s in g.senders} | {r.stage for r in g.receivers})
    recv_reached = torch.zeros(n_r, t, dtype=torch.bool)
    for st in stages:
        for r in (i for i, x in enumerate(g.receivers) if x.stage == st):
            e = r_idx == r
            recv_reached[r] = (k[e] & reached[s_idx[e]]).any(0)
        for s in (i for i, x in enumerate(g.senders) if x.stage == st):
            if not g.reads_of[s]:
                reached[s] = True  # a source: the embedding
            for r in g.reads_of[s]:
                reached[s] |= recv_reached[r].cummax(0).values if g.receivers[r].across else recv_reached[r]
    sender_useful = torch.zeros(n_s, t, dtype=torch.bool)
    for st in reversed(stages):
        for s in (i for i, x in enumerate(g.senders) if x.stage == st):
            e = s_idx == s
            sender_useful[s] = (k[e] & useful[r_idx[e]]).any(0)
        for r in (i for i, x in enumerate(g.receivers) if x.stage == st):
            receiver = g.receivers[r]
            if not receiver.through:
                useful[r] = True  # terminal: the logits
            for s in receiver.through:
                later = sender_useful[s].flip(0).cummax(0).values.flip(0)  # useful at some t' >= t
                useful[r] |= later if receiver.across else sender_useful[s]
    kept = k & reached[s_idx] & useful[r_idx]
    return Circuit(g, kept if circuit.per_position else kept[:, 0])


def faithfulness(model: Any, clean, corrupt, metric, circuit: Circuit | Sequence[str], *,
                 ablation: Ablation = "corrupt", mean_tokens: torch.Tensor | Sequence[str] | None = None,
                 batch_size: int = 16, patch_batch_size: int = 64) -> float:
    """(L(C) - L(corrupt)) / (L(clean) - L(corrupt)), means over pairs, with every edge outside
    ``circuit`` (a ``Circuit`` or edge names) patched: from the corrupt prompt (``ablation="corrupt"``)
    or from its sender's mean write over the calibration prompts ``mean_tokens`` (``"mean"``)."""
    with eval_mode(model, "faithfulness()"):
        # a feature circuit's graph holds the features it kept: run on it (an edge graph of the model's own
        # components is built afresh, so that a circuit of another model is refused by its edges)
        graph = circuit.graph if isinstance(circuit, Circuit) and kept_of(circuit.graph) else None
        ctx = make_context(model, clean, corrupt, metric, batch_size=batch_size, patch_batch_size=patch_batch_size,
                           graph=graph)
        mean = ablation_writes(ctx, ablation, mean_tokens)
        ctx.check_structure()
        return _faithfulness(ctx, [_as_circuit(ctx.graph, circuit)], mean)[0][0]


def ablation_writes(ctx: Context, ablation: str, mean_tokens) -> Writes | None:
    """The mean writes mean ablation patches in, or None for corrupt ablation; bad input fails first."""
    if ablation not in ("corrupt", "mean"):
        raise ValueError(f"ablation must be 'corrupt' (patch from the corrupt run) or 'mean' (each sender's mean "
                         f"write over mean_tokens), got {ablation!r}")
    if ablation == "corrupt":
        if mean_tokens is not None:
            raise ValueError("mean_tokens are the calibration prompts of ablation='mean'; corrupt ablation takes none")
        return None
    if mean_tokens is None:
        raise ValueError("ablation='mean' needs mean_tokens: held-out calibration prompts (strings or token ids "
                         "[n, T]) whose sender writes are averaged per position")
    cal = make_pairs(ctx.host, mean_tokens, mean_tokens)
    if cal.width != ctx.pairs.width or cal.padded:
        raise ValueError(f"every calibration prompt must have the pairs' length, {ctx.pairs.width} tokens (writes are "
                         f"averaged per position); got prompts of up to {cal.width} tokens"
                         + (", of different lengths" if cal.padded else ""))
    if isinstance(ctx.pairs, Pairs):
        ends = torch.cat([ctx.pairs.clean, ctx.pairs.corrupt]).to(cal.clean.device)
        leaked = (cal.clean[:, None] == ends[None]).all(-1).any(-1).nonzero().flatten().tolist()
        if leaked:
            raise ValueError(f"calibration prompt(s) {leaked[:5]} equal a clean or corrupt prompt of the pairs; "
                             "mean ablation needs held-out prompts")
    return ctx.mean_writes(cal.clean, cal.mask)


def _as_circuit(graph: Graph, circuit: Circuit | Sequence[str]) -> Circuit:
    if isinstance(circuit, Circuit):
        if circuit.graph.names != graph.names:
            raise ValueError("the circuit was built on another model's graph (its edges differ from this model's)")
        return circuit
    if isinstance(circuit, str):
        raise TypeError("circuit must be a Circuit or a list of edge names, not one string")
    return Circuit.from_names(graph, list(circuit))


def left_out(result: EdgeResult) -> pd.DataFrame:
    """What a feature graph left out, exactly: per dictionary, the mean over pairs of the metric's
    change when every feature the graph did not keep is patched for every reader at once (its rest
    node's edges; ``effect``), and that change over L(corrupt) - L(clean) (``fraction``: 1 where
    the features left out alone carry the whole behaviour). One patched run per pair and dictionary."""
    g, ctx = result.graph, result.context
    rests = [(i, s) for i, s in enumerate(g.senders) if s.kind == "rest"]
    if not rests:
        raise ValueError("the result has no dictionaries of features (attribute_edges(features=...)): nothing is "
                         "left out of its graph")
    masks = [g.sender_index == i for i, _ in rests]
    with eval_mode(ctx.host.model, "left_out()"):
        clean, corrupt, values = ctx.circuit_metrics(masks, desc="left out")
    return pd.DataFrame({"dictionary": [s.name.rsplit(".", 1)[0] for _, s in rests],
                         "effect": [v - clean for v in values],
                         "fraction": [(v - clean) / (corrupt - clean) for v in values]})


def faithfulness_of(result: EdgeResult, circuits: list[Circuit], *, ablation: Ablation = "corrupt",
                    mean_tokens: torch.Tensor | Sequence[str] | None = None) -> list[float]:
    """Faithfulness of each of ``circuits`` on ``result``'s model, pairs and metric (the clean and
    corrupt runs shared between them); ``ablation``/``mean_tokens`` as in ``faithfulness``."""
    with eval_mode(result.context.host.model, "faithfulness_of()"):
        ctx = result.context
        circuits = [_as_circuit(result.graph, c) for c in circuits]
        return _faithfulness(ctx, circuits, ablation_writes(ctx, ablation, mean_tokens))[0]


#: edge classes by what the receiver reads, as TransformerLens 4.3's faithfulness breaks recovery out (a
#: dictionary's nodes at an MLP read what the MLP reads)
EDGE_CLASSES = {"q": "into_qk", "k": "into_qk", "v": "into_v", "mlp": "into_mlp", "logits": "into_logits",
                "feature": "into_mlp", "error": "into_mlp", "rest": "into_mlp"}


def faithfulness_by_class(result: EdgeResult, circuit: Circuit | Sequence[str], *, ablation: Ablation = "corrupt",
                          mean_tokens: torch.Tensor | Sequence[str] | None = None) -> dict[str, float]:
    """The circuit's faithfulness (``"all"``) and, per edge class (``EDGE_CLASSES``: edges into
    queries and keys, values, MLPs, the logits), its faithfulness after also removing the circuit's
    edges of that class: how much the circuit needs them (conditional, not additive; a class the
    circuit has no edge of gets the aggregate). TransformerLens 4.3's per-class recovery, over all
    pairs at once; one patched run per pair for the circuit and for each class it has."""
    with eval_mode(result.context.host.model, "faithfulness_by_class()"):
        ctx = result.context
        return by_class(ctx, _as_circuit(result.graph, circuit), ablation_writes(ctx, ablation, mean_tokens))[0]


def edge_classes(graph: Graph) -> list[str]:
    """Each edge's class (``EDGE_CLASSES``), in edge order."""
    return [EDGE_CLASSES[graph.receivers[r].kind] for r in graph.receiver_index.tolist()]


def by_class(ctx: Context, circuit: Circuit, mean: Writes | None = None) -> tuple[dict[str, float], float, float]:
    """``faithfulness_by_class`` on a context, with the mean writes of mean ablation (``ablation_writes``) or
    None; and the means over pairs of the metric on the clean and on the corrupt prompts."""
    kinds = edge_classes(ctx.graph)
    keep = circuit.keep  # [edge] or [edge, pos]
    held = {c: keep & torch.tensor([k == c for k in kinds]).reshape((-1,) + (1,) * (keep.ndim - 1))
            for c in sorted(set(kinds))}
    present = [c for c, mask in held.items() if bool(mask.any())]
    values, clean, corrupt = _faithfulness(ctx, [circuit, *(Circuit(ctx.graph, keep & ~held[c]) for c in present)],
                                           mean)
    without = dict(zip(present, values[1:]))
    return {"all": values[0], **{c: without.get(c, values[0]) for c in held}}, clean, corrupt


def _faithfulness(ctx: Context, circuits: list[Circuit], mean: Writes | None = None
                  ) -> tuple[list[float], float, float]:
    """Each circuit's faithfulness, and the means over pairs of the metric on the clean and on the
    corrupt prompts (the clean and corrupt runs shared between the circuits)."""
    t = ctx.pairs.width
    for c in circuits:
        if c.per_position and c.keep.shape[1] != t:
            raise ValueError(f"the circuit has {c.keep.shape[1]} positions but the prompts have {t} tokens")
    # from the corrupt run, the empty circuit feeds every receiver the corrupt residual, which is the corrupt run:
    # 0 exactly, not patched (its patched run sums the corrupt writes in another order: -4.5e-8 on the float32
    # demo model); under mean ablation it is a run of its own
    runs = [c for c in circuits if c.keep.any() or mean is not None]
    clean, corrupt, values = ctx.circuit_metrics([~c.keep for c in runs], mean=mean)
    if clean == corrupt:
        raise ValueError("the metric is the same on the clean and the corrupt prompts (mean over pairs), so "
                         "faithfulness is undefined; use pairs the metric tells apart")
    ran = iter((v - corrupt) / (clean - corrupt) for v in values)
    return [next(ran) if c.keep.any() or mean is not None else 0.0 for c in circuits], clean, corrupt


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top ``sizes[i]`` edges (pruned: ``kept[i]`` remain) at fractions
    ``percentages[i]`` of the edges, with MIB's summaries: ``cpr`` (area under the curve), ``cmd``
    (area between the curve and 1), ``average``; ``forward_passes`` the curve cost."""

    percentages: tuple[float, ...]
    sizes: tuple[int, ...]
    kept: tuple[int, ...]
    faithfulness: tuple[float, ...]
    cpr: float
    cmd: float
    average: float
    forward_passes: int


def faithfulness_curve(result: EdgeResult, percentages: Sequence[float] = MIB_PERCENTAGES, *,
                       rank: str = "abs", prune: bool = True) -> FaithfulnessCurve:
    """Faithfulness of the top int(p * n_edges) edges of ``result`` for each p of ``percentages``
    (increasing, in (0, 1]), on the result's own model, pairs and metric."""
    ps = tuple(float(p) for p in percentages)
    if len(ps) < 2 or any(not 0 < p <= 1 for p in ps) or list(ps) != sorted(set(ps)):
        raise ValueError(f"percentages must be at least two increasing fractions in (0, 1], got {percentages!r}")
    ctx = result.context
    n = result.scores.numel()
    sizes = tuple(int(p * n) for p in ps)
    circuits = [top_circuit(result, size, prune=prune, rank=rank) for size in sizes]
    before = ctx.forward_passes
    f = faithfulness_of(result, circuits)
    cpr, cmd = trapezoid(ps, f), trapezoid(ps, [abs(1 - v) for v in f])
    return FaithfulnessCurve(ps, sizes, tuple(c.n_edges for c in circuits), tuple(f), cpr, cmd, sum(f) / len(f),
                             ctx.forward_passes - before)


def trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    """The trapezoidal-rule area under y(x)."""
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))

"""A one-import swap for TransformerLens's own attribution patching
(``transformer_lens.tools.analysis.attribution_patching.attribution_patch``, TransformerLens 4.3):

    from atp_plugin.tl_attribution import attribution_patch, faithfulness   # instead of TransformerLens's
    result = attribution_patch(model, clean, corrupt, metric_fn)          # AtP*, node granularity
    result = attribution_patch(model, clean, corrupt, metric_fn, method="atp")   # its numbers
    edges = attribution_patch(model, clean, corrupt, metric_fn, EdgeAttributionConfig(granularity="edge"))
    kept = faithfulness(model, clean[:1], corrupt[:1], metric_fn, edges.top_edges(k=50))

Same arguments, same return types (TransformerLens's ``AttributionResult`` with ``node_scores``
keyed by its ``Node``: ``embed``, ``attn_head_out`` and ``mlp_out`` at every position, and at edge
granularity ``edge_scores`` keyed by (writer, reader) ``Node`` pairs; ``FaithfulnessResult``),
computed by this library's engines for all pairs in batches instead of one pair at a time. Edge
granularity takes ``method`` ``"atp"`` (the default there: TransformerLens's EAP), ``"atp+qk"`` or
``"ig"``; ``node_scores`` are then each writer's edge scores summed, as TransformerLens aggregates
them.

Conventions: TransformerLens takes gradients on the *corrupt* run and estimates patching each node
from corrupt toward clean (``(a_clean - a_corrupt) . dL/da |corrupt``). That is ``attribute()``
with the two prompt lists swapped, which is what this function runs: with ``method="atp"`` the
scores equal TransformerLens's (signed, means over pairs). ``attribute()``'s own convention
patches corrupt into clean, so its ``signed`` values for the same prompts are the opposite
direction's estimate. With ``method="atp*"`` (the default) or ``"atp+gd"`` the scores are
GradDrop's means of per-pair magnitudes, >= 0: rank by them, they carry no sign. An head output's
estimate equals that of its ``hook_z`` (the write is linear in z), so heads are scored at ``hook_z``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .attribution import attribute, eval_mode
from .edges import Circuit, EdgeResult, Graph, attribute_edges
from .edges.attribute import make_context
from .edges.circuit import ablation_writes, by_class, edge_classes
from .errors import MissingDependencyError

METHODS = ("atp*", "atp", "atp+gd", "atp+qk")
EDGE_METHODS = ("atp", "atp+qk", "ig")


def _tl() -> Any:
    try:
        from transformer_lens.tools.analysis import attribution_patching
    except ImportError as e:
        raise MissingDependencyError("attribution_patch() returns TransformerLens's own result types, which this "
                                     f"TransformerLens lacks ({e}); install transformer-lens>=4.3") from e
    return attribution_patching


def attribution_patch(model: Any, clean: torch.Tensor, corrupt: torch.Tensor,
                      metric_fn: Callable[[torch.Tensor], torch.Tensor], config: Any = None, *,
                      method: str | None = None, batch_size: int | None = None) -> Any:
    """TransformerLens's ``attribution_patch`` computed by atp-plugin (see the module docstring).

    ``metric_fn`` maps one example's logits ``[1, seq, vocab]`` to a scalar, as TransformerLens
    expects; ``config`` is its ``EdgeAttributionConfig``. ``method``: ``"atp*"`` by default at node
    granularity (or ``METHODS``), ``"atp"`` at edge granularity (or ``EDGE_METHODS``)."""
    tl = _tl()
    config = tl.EdgeAttributionConfig() if config is None else config
    edges = config.granularity == "edge"
    allowed = EDGE_METHODS if edges else METHODS
    method = allowed[0] if method is None else method
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed} at {config.granularity} granularity, got {method!r}")

    def per_pair(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([metric_fn(logits[i:i + 1]).reshape(()) for i in range(logits.shape[0])])

    # TransformerLens's direction: gradients on the corrupt run, toward the clean values
    if edges:
        return _edge_result(tl, attribute_edges(model, corrupt, clean, per_pair, method=method, per_position=True,
                                                batch_size=batch_size))
    result = attribute(model, corrupt, clean, per_pair, nodes=["embed", "attn_z", "mlp_out"], method=method,
                       batch_size=batch_size)
    values = result.signed if method in ("atp", "atp+qk") else result.scores
    embed, heads, mlps = (values[k].double().cpu() for k in ("embed", "attn_z", "mlp_out"))
    scores: dict[Any, float] = {}
    for pos in range(embed.shape[0]):
        scores[tl.Node("embed", pos)] = float(embed[pos])
        for layer in range(heads.shape[0]):
            for head in range(heads.shape[2]):
                scores[tl.Node("attn_head_out", pos, layer, head)] = float(heads[layer, pos, head])
            scores[tl.Node("mlp_out", pos, layer)] = float(mlps[layer, pos])
    return tl.AttributionResult(node_scores=scores)


#: TransformerLens's node kind of each of our sender and receiver kinds
_KINDS = {"embed": "embed", "head": "attn_head_out", "mlp": "mlp_out", "q": "q_input", "k": "k_input",
          "v": "v_input", "mlp_in": "mlp_in", "logits": "logits"}


def _tl_edges(tl: Any, graph: Graph, t: int) -> list[tuple[Any, Any]]:
    """TransformerLens's (writer, reader) ``Node`` pair of each of our edges at each position,
    ``[edge, pos]`` flattened (edge-major)."""
    def node(part: Any, pos: int, receiving: bool) -> Any:
        kind = "mlp_in" if receiving and part.kind == "mlp" else part.kind
        if kind == "logits":
            return tl.Node("logits", pos, graph.n_layers - 1)
        return tl.Node(_KINDS[kind], pos, None if kind == "embed" else part.layer, None if part.head < 0 else part.head)
    pairs = [(graph.senders[s], graph.receivers[r])
             for s, r in zip(graph.sender_index.tolist(), graph.receiver_index.tolist())]
    return [(node(s, pos, False), node(r, pos, True)) for s, r in pairs for pos in range(t)]


def _edge_result(tl: Any, result: EdgeResult) -> Any:
    """Our per-position edge result as TransformerLens's ``AttributionResult``."""
    keys = _tl_edges(tl, result.graph, result.scores.shape[1])
    edge_scores = dict(zip(keys, result.signed.double().reshape(-1).tolist()))
    node_scores: dict[Any, float] = {}
    for (writer, _), score in edge_scores.items():
        node_scores[writer] = node_scores.get(writer, 0.0) + score
    return tl.AttributionResult(node_scores=node_scores, edge_scores=edge_scores)


def faithfulness(model: Any, clean: torch.Tensor, corrupt: torch.Tensor,
                 metric_fn: Callable[[torch.Tensor], torch.Tensor], circuit: Sequence[tuple], config: Any = None, *,
                 mean_tokens: torch.Tensor | None = None) -> Any:
    """TransformerLens's ``faithfulness`` computed by atp-plugin: the same arguments (``circuit`` as
    (writer, reader) or (writer, reader, score) ``Node`` tuples, ``config`` its ``FaithfulnessConfig``,
    ``mean_tokens`` for mean ablation) and its ``FaithfulnessResult``, per edge class included;
    the clean and corrupt prompts may hold several pairs here (means over them)."""
    tl = _tl()
    config = tl.FaithfulnessConfig() if config is None else config

    def per_pair(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([metric_fn(logits[i:i + 1]).reshape(()) for i in range(logits.shape[0])])

    with eval_mode(model, "faithfulness()"):
        ctx = make_context(model, clean, corrupt, per_pair)
        t = ctx.pairs.width
        index = {edge: i for i, edge in enumerate(_tl_edges(tl, ctx.graph, t))}
        wanted = {(e[0], e[1]) for e in circuit}
        unknown = [e for e in wanted if e not in index]
        if unknown:
            raise ValueError(f"circuit holds {len(unknown)} edge(s) that are not in the graph, starting with "
                             f"{unknown[0]}")
        keep = torch.zeros(ctx.graph.n_edges * t, dtype=torch.bool)
        keep[[index[e] for e in wanted]] = True
        recovered, full, corrupt_metric = by_class(ctx, Circuit(ctx.graph, keep.reshape(ctx.graph.n_edges, t)),
                                                   ablation_writes(ctx, config.ablation, mean_tokens))
    kinds = edge_classes(ctx.graph)
    counts = {c: kinds.count(c) * t for c in dict.fromkeys(kinds)}
    return tl.FaithfulnessResult(recovered=recovered["all"], full_metric=full, corrupt_metric=corrupt_metric,
                                 circuit_size=len(wanted), total_edges=len(index),
                                 edge_class_recovered={c: recovered[c] for c in counts}, edge_class_counts=counts)

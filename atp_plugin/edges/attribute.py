"""``attribute_edges()``: score every edge of a model's residual-stream graph for a behaviour."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from .. import plugins
from ..attribution import DEFAULT_BATCH, check_length, eval_mode, host_for, make_source, positive_int
from ..engine import Engine, distributed
from ..engine.memory import check_max_memory
from ..engine.path import with_steps
from ..engine.stream import PairStream
from ..errors import UnsupportedModelError
from ..hosts import Host
from ..hosts.structure import Structure
from ..metrics import check_metric
from .build import build_graph
from .context import Context
from .features import Keep, Placement, check_keep, kept_features, placement
from .graph import Graph
from .result import EdgeResult


def attribute_edges(model: Any, clean: torch.Tensor | Sequence[str] | PairStream,
                    corrupt: torch.Tensor | Sequence[str] | None = None, metric=None, *, method: Any = "atp",
                    ig_steps: int | None = None, per_position: bool = False,
                    batch_size: int | Literal["auto"] | None = None, patch_batch_size: int = 64,
                    max_memory: float | None = None, progress: bool | None = None, features: Sequence[Any] = (),
                    keep: Keep = 20) -> EdgeResult:
    """Score every edge u -> v by how much patching it (v alone reads u's corrupt write) changes ``metric``.

    ``clean``/``corrupt`` (or a ``PairStream`` and no ``corrupt``), ``metric`` and ``batch_size`` as
    in ``attribute()``. ``method``: a registered edge method's name, ``"atp"`` (EAP) by default,
    ``"atp+qk"``, ``"ig"`` (EAP-IG) or ``"ap"`` (exact), or an edge method instance (see
    ``edges.methods``). ``ig_steps``: gradient points of an IG method (10 by default; methods without
    steps ignore it). ``per_position``: score each edge at each position (``[edge, pos]``) instead of
    the edge patched at every position at once (``[edge]``, what EAP reports). ``batch_size="auto"``:
    the largest batch whose peak fits ``max_memory`` bytes by ``estimate_edges()`` (a few seconds of
    probe runs; not for ``ap``, whose ``patch_batch_size`` copies run at a time). Scores are means over
    pairs of |I| (``ap``: |mean I|); ``signed`` holds the means of I. Under ``torch.distributed``
    (torchrun) each rank runs its share of the pairs and every rank gets the whole result.

    ``features``: ``SAEFeatures`` / ``TranscoderFeatures`` adapters (at most one per MLP output and
    per attention output) whose features replace the component they split (``edges.features``):
    edges then start and end at features, error nodes and each dictionary's rest. ``keep``: which
    features are nodes: the top ``keep`` of each dictionary (an int; by node AtP, ``attribute(...,
    method="atp")``, summed over positions: one more forward pass per pair of each prompt and one
    backward, counted in ``forward_passes``), every feature whose summed node score reaches a
    threshold (a float), or a dict dictionary name -> feature numbers (no node run).
    """
    edge_method = with_steps(resolve_method(method), ig_steps)
    if metric is None:
        raise TypeError("attribute_edges() needs a metric: attribute_edges(model, clean, corrupt, metric) or "
                        "attribute_edges(model, PairStream(...), metric=metric)")
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position must be True or False, got {per_position!r}")
    if batch_size == "auto" and features:
        raise ValueError("batch_size='auto' sizes batches by probe runs of the model's own graph, which do not "
                         "cover features= yet; give batch_size an int")
    if batch_size != "auto":
        batch_size = positive_int(batch_size or DEFAULT_BATCH, "batch_size",
                                  'it is the number of pairs run at a time, or "auto"')
    patch_batch_size = positive_int(patch_batch_size, "patch_batch_size",
                                    "it is the number of patched prompts run at a time")
    max_memory = check_max_memory(max_memory)
    with eval_mode(model, "attribute_edges()"):
        first = DEFAULT_BATCH if batch_size == "auto" else batch_size
        ctx = make_context(model, clean, corrupt, metric, batch_size=first, patch_batch_size=patch_batch_size,
                           progress=progress, features=features, keep=keep)
        if batch_size == "auto":  # sized once the pairs' width and number are known
            from ..estimate import estimate_edges  # it probes through attribute_edges()
            found = estimate_edges(model, ctx.pairs.width, edge_method, "auto", n_pairs=ctx.pairs.n,
                                   max_memory=max_memory).batch_size
            ctx.engine.batch_size = distributed.all_min(found, ctx.host.device)  # one for all ranks
        scores, signed = edge_method.run(ctx, per_position)
    pairs = ctx.pairs
    return EdgeResult(edge_method.name, ctx.graph, scores, signed, per_position, pairs.counts.cpu(), pairs.n,
                      pairs.alignment, ctx.forward_passes, ctx.backward_passes, ctx)


def resolve_method(method: Any) -> Any:
    """A registered edge method by name, or ``method`` itself if it is one (``name`` and ``run``)."""
    known = plugins.edge_methods()
    if isinstance(method, str):
        if method not in known:
            raise ValueError(f"unknown edge method {method!r}; known: {', '.join(known)}")
        return known[method]
    if isinstance(getattr(method, "name", None), str) and callable(getattr(method, "run", None)):
        return method
    raise TypeError(f"method must be an edge method's name ({', '.join(known)}) or an object with `name` and "
                    f"`run(ctx, per_position)`, got {method!r}")


def make_context(model: Any, clean, corrupt, metric, *, batch_size: int = DEFAULT_BATCH, patch_batch_size: int = 64,
                 progress: bool | None = None, features: Sequence[Any] = (), keep: Keep = 20,
                 graph: Graph | None = None) -> Context:
    """Validated pairs, the model's structure and graph (``graph`` where given: a feature graph to
    reuse), and the engine that batches the pairs and binds the metric; bad input fails before
    any run, the node run that picks ``features``' kept features (``attribute_edges``) first of
    all work. Call it with the model in eval mode."""
    host = host_for(model)
    parts = structure(host)
    pairs = make_source(host, clean, corrupt)
    check_length(host, pairs.width)
    check_metric(metric, pairs, host.d_vocab)
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"features= takes a list of SAEFeatures / TranscoderFeatures adapters, got {features!r}")
    placed = [placement(parts, adapter) for adapter in features]
    names = [p.adapter.name for p in placed]
    if len(set(names)) != len(names):
        raise ValueError(f"features= holds two dictionaries named alike ({names}); give each a distinct name=")
    engine = Engine(host, pairs, metric, [], batch_size=batch_size, patch_batch_size=patch_batch_size,
                    progress=progress)
    if graph is not None and any(getattr(w, "parts", parts).host.model is not model for w in graph.writers):
        raise ValueError("the circuit's feature graph was built on another model; find its circuit on this one")
    if graph is None:
        kept, forward, backward = choose_features(model, clean, corrupt, metric, placed, keep, batch_size, progress)
        engine.forward_passes += forward
        engine.backward_passes += backward
        graph = build_graph(parts, [(p, kept[p.adapter.name]) for p in placed])
    return Context(parts, graph, engine)


def choose_features(model: Any, clean, corrupt, metric, placed: Sequence[Placement], keep: Keep, batch_size: int,
                    progress: bool | None) -> tuple[dict[str, list[int]], int, float]:
    """The features each dictionary keeps (``features.kept_features``), and the forward and backward
    passes spent choosing them: none for a mapping, else one node AtP run over the dictionaries."""
    names = [p.adapter.name for p in placed]
    if isinstance(keep, Mapping) or not placed:
        return kept_features(keep, {}, names), 0, 0.0
    check_keep(keep, names)  # before the node run
    from ..attribution import attribute
    node = attribute(model, clean, corrupt, metric, nodes=[p.adapter for p in placed], method="atp",
                     batch_size=batch_size, progress=progress)
    counted = node.require_engine("the node run of features=")
    return (kept_features(keep, {n: node.scores[n].sum(0) for n in names}, names), counted.forward_passes,
            counted.backward_passes)


def structure(host: Host) -> Structure:
    """The host's ``structure()`` capability, or a clear error: edges need it, node methods do not."""
    get = getattr(host, "structure", None)
    if get is None:
        raise UnsupportedModelError(
            f"edge attribution needs the host's structure() capability (weights, norms and MLPs as the edge engine "
            f"recomputes them), which the {host.name} host does not offer; attribute() (node scores) works, or give "
            "the host a structure() method (see docs/plugins.md)")
    return get()

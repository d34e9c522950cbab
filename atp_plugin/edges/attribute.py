"""``attribute_edges()``: score every edge of a model's residual-stream graph for a behaviour."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..attribution import check_length, eval_mode, host_for, positive_int
from ..engine import bind_metric
from ..engine.pairs import make_pairs
from ..engine.runs import run
from ..engine.stream import PairStream
from ..metrics import check_metric
from .context import Context
from .graph import build_graph
from .model import check_structure, parts_of
from .result import EdgeResult
from .scores import atp_batch, ig_batch
from .values import receiver_hooks, sender_hooks

#: method -> what it computes
METHODS = {
    "atp": "EAP: each sender's change dotted with the gradient of its receiver's input (one clean backward)",
    "atp+qk": "EAP with the QK fix for edges into queries and keys",
    "ig": "EAP-IG (inputs variant): gradients averaged over ig_steps points from clean to corrupt embeddings",
    "ap": "exact edge patching of every edge (the ground truth; one patched forward per edge and pair)",
}
DEFAULT_BATCH = 16


def attribute_edges(model: Any, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str], metric,
                    *, method: str = "atp", ig_steps: int = 10, per_position: bool = False,
                    batch_size: int | None = None, patch_batch_size: int = 64,
                    progress: bool | None = None) -> EdgeResult:
    """Score every edge u -> v by how much patching it (v alone reads u's corrupt write) changes ``metric``.

    ``clean``/``corrupt``, ``metric`` and ``batch_size`` as in ``attribute()``. ``method``: ``"atp"``
    (EAP), ``"atp+qk"``, ``"ig"`` (EAP-IG with ``ig_steps`` gradient points) or ``"ap"`` (exact).
    ``per_position``: score each edge at each position (``[edge, pos]``) instead of the edge patched
    at every position at once (``[edge]``, what EAP reports). Scores are means over pairs of |I|
    (``ap``: |mean I|); ``signed`` holds the means of I.
    """
    if method not in METHODS:
        raise ValueError(f"unknown edge method {method!r}; known: {', '.join(METHODS)}")
    ig_steps = positive_int(ig_steps, "ig_steps", "it is the number of gradient points along the path")
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position must be True or False, got {per_position!r}")
    batch_size = positive_int(batch_size or DEFAULT_BATCH, "batch_size", "it is the number of pairs run at a time")
    patch_batch_size = positive_int(patch_batch_size, "patch_batch_size",
                                    "it is the number of patched prompts run at a time")
    with eval_mode(model, "attribute_edges()"):
        # EAP checks the model's structure on its own first clean run; the other methods on one prompt first
        ctx = make_context(model, clean, corrupt, metric, batch_size=batch_size, patch_batch_size=patch_batch_size,
                           progress=progress, check=method not in ("atp", "atp+qk"))
        if method == "atp+qk":
            for layer in range(ctx.parts.n_layers):  # unsupported attention fails here, before the method runs
                ctx.host.attention(layer)
                ctx.parts.check_rotary(layer)
        scores, signed = _run(ctx, method, ig_steps, per_position)
    pairs = ctx.pairs
    return EdgeResult(method, ctx.graph, scores, signed, per_position, pairs.mask.sum(0).cpu(), pairs.n,
                      pairs.alignment, ctx.forward_passes, ctx.backward_passes, ctx)


def make_context(model: Any, clean, corrupt, metric, *, batch_size: int = DEFAULT_BATCH, patch_batch_size: int = 64,
                 progress: bool | None = None, check: bool = True) -> Context:
    """Validated pairs, the model's parts and graph, and the bound metric; bad input fails before any
    run, then (``check``) the model's structure is checked on one clean prompt (``check_structure``).
    Call it with the model in eval mode."""
    if isinstance(clean, PairStream):
        raise TypeError("edge attribution takes the pairs as lists or token tensors; a PairStream is read by "
                        "attribute() (node scores) only: give a list of the pairs (e.g. a sample of the stream)")
    host = host_for(model)
    parts = parts_of(host)
    pairs = make_pairs(host, clean, corrupt)
    check_length(host, pairs.clean.shape[1])
    check_metric(metric, pairs, host.d_vocab)
    acc = torch.float64 if host.dtype == torch.float64 else torch.float32
    if check:
        with torch.no_grad():  # one prompt, not counted as the method's cost
            _, values = run(host, pairs.clean[:1], pairs.mask[:1], receiver_hooks(parts) | sender_hooks(parts))
        check_structure(parts, values, pairs.mask[:1])
    return Context(parts, build_graph(parts), pairs, bind_metric(metric), acc, batch_size, patch_batch_size, progress)


def _run(ctx: Context, method: str, ig_steps: int, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and signed means, ``[edge, pos]`` or ``[edge]``."""
    if method == "ap":
        return _exact(ctx, per_position)
    sums = abs_sums = torch.zeros((), dtype=ctx.dtype)  # grow to [edge(, pos)] on the first batch
    for n, idx in enumerate(ctx.batches(f"edges ({method})")):
        tokens, corrupt, mask = ctx.pairs.clean[idx], ctx.pairs.corrupt[idx], ctx.pairs.mask[idx]
        if method == "ig":
            est = ig_batch(ctx.parts, ctx.graph, tokens, corrupt, mask, ctx.bound(idx), ctx.dtype, ig_steps)
            ctx.forward_passes += (1 + ig_steps) * len(idx)
            ctx.backward_passes += ig_steps * len(idx)
        else:
            est = atp_batch(ctx.parts, ctx.graph, tokens, corrupt, mask, ctx.bound(idx), ctx.dtype,
                            qk=method == "atp+qk", check=n == 0)
            ctx.forward_passes += 2 * len(idx)
            ctx.backward_passes += len(idx)
        est = est.cpu()  # [batch, edge, pos]
        if not per_position:
            est = est.sum(-1)  # [batch, edge]: the edge patched at every position, to first order
        sums, abs_sums = sums + est.sum(0), abs_sums + est.abs().sum(0)
    count = ctx.pairs.mask.sum(0).cpu().to(ctx.dtype).clamp(min=1) if per_position else float(ctx.pairs.n)
    return abs_sums / count, sums / count


def _exact(ctx: Context, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """|mean I| and mean I of every edge (at every position with ``per_position``) by exact patching."""
    n_edges, t = ctx.graph.n_edges, ctx.pairs.clean.shape[1]
    if per_position:
        edges, pos = torch.arange(n_edges).repeat_interleave(t), torch.arange(t).repeat(n_edges)
    else:
        edges, pos = torch.arange(n_edges), torch.full((n_edges,), -1)
    mean, _ = ctx.edge_effects(edges, pos)
    if per_position:
        mean = mean.reshape(n_edges, t)
    return mean.abs(), mean

"""Per-pair edge estimates for one batch of pairs: EAP (``atp``), the QK fix for edges into queries
and keys (``atp+qk``) and EAP-IG (``ig``).

``atp``: one noise forward (no grad) and one clean forward + backward of the summed metric (pairs
are independent, so it gives every pair's gradient): Iatp(u -> v) = (u(noise) - u(clean)) . dL/d(v's
input) at the clean run, per position. ``ig``: the gradient averaged over runs whose embedding is
clean + (k/m)(noise - clean), k = 1..m (Hanna et al.'s "inputs" variant, right-endpoint rule;
the k = m run is the corrupt prompt's, which also gives the corrupt writes).
``atp+qk``: for an edge into a query or key, v's q (or k) recomputed from resid + (u(noise) -
u(clean)) through ln1, W and rotary, the attention row(s) recomputed exactly through the softmax
(``engine.qk``: the one QK fix, of which a node's is the one-sender case; here every sender of a
layer at once) and dotted with G = dL/dA; the clean scores are recomputed from q and k as for the
node fix (``engine.qk.scores``: one numerical contract, so a score bias such as ALiBi is refused by
both).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..engine import qk as qkfix
from ..engine.path import interpolate, path_points
from ..engine.runs import run
from ..hosts import AttentionGeometry
from ..hosts.structure import Structure, hook_names
from .build import check_graph, check_hooks
from .graph import Graph
from .groups import AttentionReads, HeadWrites, Writes
from .values import (
    ReadSums,
    edge_products,
    grad_targets,
    receiver_grads,
    receiver_hooks,
    record,
    sender_deltas,
    sender_hooks,
)

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits -> [batch]


def _gradient_run(parts: Structure, graph: Graph, tokens: torch.Tensor, mask: torch.Tensor, metric: Metric,
                  extra: set[str], patches: dict | None = None, senders: bool = True, also: set[str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward + backward: hook values (detached; the senders' with ``senders``, and ``also``'s)
    and the gradients ``grad_targets`` and ``extra`` need."""
    targets = grad_targets(graph) + sorted(extra - set(grad_targets(graph)))
    capture = receiver_hooks(graph) | set(targets) | (sender_hooks(graph) if senders else set()) | (also or set())
    with torch.enable_grad():
        logits, values = run(parts.host, tokens, mask, capture, patches)
        grads = torch.autograd.grad(metric(logits).sum(), [values[h] for h in targets])
    return {h: v.detach() for h, v in values.items()}, dict(zip(targets, grads))


def atp_batch(parts: Structure, graph: Graph, tokens: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor,
              metric: Metric, dtype: torch.dtype, *, qk: bool, check: bool = False) -> torch.Tensor:
    """Iatp (Iqk for edges into q/k with ``qk``) per pair, edge and position: ``[batch, edge, pos]``, 0
    at padding. ``check``: first check the model's structure on the clean run's first prompt."""
    with torch.no_grad():
        _, noise_values = run(parts.host, corrupt, mask, sender_hooks(graph))
        noise = record(graph, noise_values)
    geoms = {layer: parts.host.attention(layer) for layer in range(parts.n_layers)} if qk else {}
    extra = {h for g in geoms.values() for h in (g.q_hook, g.k_hook, g.scores_hook, g.pattern_hook)}
    if qk:
        extra |= parts.rotation_hooks() | {h for g in geoms.values() if g.rotation for h in g.rotation.reads}
    values, grads = _gradient_run(parts, graph, tokens, mask, metric, extra,
                                  also=check_hooks(parts, graph) if check else None)
    if check:
        check_graph(parts, graph, {h: v[:1] for h, v in values.items()}, mask[:1])
    with torch.no_grad():
        real = mask[:, :, None, None]
        clean = record(graph, values)
        delta = sender_deltas(graph, noise, clean, dtype) * real
        out = edge_products(graph, delta, receiver_grads(graph, values, grads, dtype))
        for layer, geom in geoms.items():
            _qk_fix(parts, graph, layer, geom, values, grads, delta, noise, clean, mask, out, dtype)
    return out * mask[:, None, :]


def ig_batch(parts: Structure, graph: Graph, tokens: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor,
             metric: Metric, dtype: torch.dtype, steps: int) -> torch.Tensor:
    """Iig per pair, edge and position ``[batch, edge, pos]``: the sender's change dotted with the
    receiver's gradient averaged over ``steps`` runs along the embedding path."""
    embed = hook_names(0).resid_pre
    reads = ReadSums(graph, dtype)
    # the path's last point (alpha = 1) is the corrupt prompt itself: its run also gives the corrupt
    # writes and the embedding the other points move towards
    noise, grads = _gradient_run(parts, graph, corrupt, mask, metric, set())
    with torch.no_grad():
        reads.add(noise, grads)
        _, clean = run(parts.host, tokens, mask, sender_hooks(graph))
        delta = sender_deltas(graph, record(graph, noise), record(graph, clean), dtype) * mask[:, :, None, None]
    noise_embed = noise[embed]
    del noise, clean, grads
    for alpha in path_points(steps)[:-1]:
        values, grads = _gradient_run(parts, graph, tokens, mask, metric, set(),
                                      {embed: interpolate(noise_embed, alpha)}, senders=False)
        with torch.no_grad():
            reads.add(values, grads)
    with torch.no_grad():
        return edge_products(graph, delta, reads.blocks()).div_(steps) * mask[:, None, :]


def _qk_fix(parts: Structure, graph: Graph, layer: int, geom: AttentionGeometry, values: dict[str, torch.Tensor],
            grads: dict[str, torch.Tensor], delta: torch.Tensor, noise: Writes, clean: Writes, mask: torch.Tensor,
            out: torch.Tensor, dtype: torch.dtype) -> None:
    """Overwrite ``out`` ``[batch, edge, pos]`` at edges into the layer's queries and keys with Iqk.

    Every sender u before the layer at once: the change of every head's q and kv-head's k at each
    position when the residual read there gains u's change (``_read_changes``), rotary applied,
    then the attention rows exactly through the softmax, dotted with G (``engine.qk``).
    """
    (lo, hi), n_q = graph.senders_before(2 * layer + 1), parts.n_heads
    reads = next(r for r in graph.readers if isinstance(r, AttentionReads) and r.layer == layer)
    n_s = hi - lo
    w = torch.cat([parts.weights(layer, which)[0] for which in "qk"]).to(dtype)  # [n_q + n_kv, d_model, d_head]
    x = values[hook_names(layer).resid_pre]  # [batch, pos, d_model]
    b, t = x.shape[:2]
    heads = {start - lo: (g.layer, g.z_change(noise.values, clean.values, dtype) * mask[:, :, None, None])
             for g, start in zip(graph.writers, graph.writer_start)
             if isinstance(g, HeadWrites) and g.additive and lo <= start < hi}
    change = _read_changes(parts, layer, x, delta[:, :, lo:hi], heads, w.permute(1, 0, 2).flatten(1), dtype)
    # [senders, batch, pos, q + kv, d_head]: rotary is linear, so the rotated change is the change rotated
    change = parts.rotate(layer, change.view(n_s, b, t, -1, w.shape[2]), mask, values)
    q, k = geom.dotted("q", values).to(dtype), geom.dotted("k", values).to(dtype)  # [batch, pos, heads, d_head]
    # only which of the model's scores are masked is read: the scores are recomputed as the node fix forms them
    seen = qkfix.unmasked(values[geom.scores_hook])
    rw, G = qkfix.rows(qkfix.scores(q, k, seen, geom), q, k, geom), grads[geom.pattern_hook].to(dtype)
    dq = change[..., :n_q, :].permute(1, 3, 0, 2, 4)  # [batch, head, senders, pos, d_head]
    # per query head: [batch, head, d_head, senders, pos]
    dk = change[..., n_q:, :].repeat_interleave(geom.group, dim=3).permute(1, 3, 4, 0, 2)
    for which, eff in (("q", qkfix.query_effects(rw, dq, k, G, geom)), ("k", qkfix.key_effects(rw, q, dk, G, geom))):
        first = graph.reader_start[id(reads)] + (0 if which == "q" else n_q)  # the group's queries, then keys
        rs = torch.arange(first, first + (n_q if which == "q" else parts.n_kv))
        edges = graph.receiver_start[rs][None, :] + torch.arange(n_s)[:, None]  # [senders, receivers]
        out[:, edges.flatten()] = eff.transpose(2, 3).flatten(1, 2)  # eff [batch, senders, pos, receivers]


def _read_changes(parts: Structure, layer: int, x: torch.Tensor, delta: torch.Tensor,
                  heads: dict[int, tuple[int, torch.Tensor]],
                  w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(ln1(x + delta_u) - ln1(x)) @ ``w`` for every sender u: ``[senders, batch, pos, out]`` from the
    residual ``x`` ``[batch, pos, d_model]``, the senders' changes ``delta`` ``[batch, pos, senders,
    d_model]``, the z changes of the earlier layers' heads ``heads`` (first sender -> (layer, ``[batch,
    pos, head, d_head]``), their writes in ``delta`` too) and ``w`` ``[d_model, out]``.

    Closed-form norms (``Structure.ln1_stats``): with x_c the centred x, d_c u's centred change, s and
    s' the norm's scale before and after, ln1(x + d) - ln1(x) = w (d_c / s' + x^ (s / s' - 1)), s'^2
    = s^2 + (2 x_c . d + d_c . d_c) / d_model. So the product needs (d_c / s') @ (w W) per sender
    only, and for a head that is (dz / s') @ (W_O (w W)): d_head rather than d_model wide, about a
    quarter of the multiply-adds of projecting every sender's d_model-wide change; each product
    is written straight into its senders' rows. Other norms: through the module.
    """
    st = parts.ln1_stats(layer, x, dtype)
    if st is None:
        dn = parts.ln1(layer, x[:, :, None] + delta.to(x.dtype)) - parts.ln1(layer, x)[:, :, None]
        return dn.to(dtype).permute(2, 0, 1, 3) @ w
    ww = w if st.w is None else st.w[:, None] * w  # [d_model, out]
    wc = ww - ww.mean(0) if st.centred else ww  # d @ wc = d_c @ ww
    b, t, n_s, d_model = delta.shape
    inv = torch.ones(b, t, n_s, dtype=dtype, device=x.device)  # 1 / s' [batch, pos, senders]
    grow = torch.zeros_like(inv)  # s'^2 - s^2
    if st.scale is not None and st.normed is not None:
        dd = torch.linalg.vector_norm(delta, dim=-1).pow_(2)  # [batch, pos, senders]
        if st.centred:
            dd -= delta.sum(-1).pow(2) / d_model  # d_c . d_c
        grow = (2 * torch.einsum("btd,btud->btu", st.normed * st.scale, delta) + dd) / d_model
        inv = (st.scale.pow(2) + grow).rsqrt()
    out = torch.empty(n_s, b * t, w.shape[1], dtype=dtype, device=x.device)  # [senders, batch * pos, out]
    dense = torch.ones(n_s, dtype=torch.bool)  # senders whose d_model-wide change is projected
    for start, (earlier, z) in heads.items():
        rows = slice(start, start + z.shape[2])
        m = torch.einsum("hed,df->hef", parts.W_O(earlier).to(dtype), wc)  # [head, d_head, out]
        torch.bmm((z * inv[:, :, rows, None]).flatten(0, 1).transpose(0, 1), m, out=out[rows])
        dense[rows] = False
    for i in dense.nonzero().flatten().tolist():
        torch.mm((delta[:, :, i] * inv[:, :, i, None]).flatten(0, 1), wc, out=out[i])
    out = out.view(n_s, b, t, -1)
    if st.scale is None or st.normed is None:
        return out
    shrink = -grow / (st.scale + 1 / inv) * inv  # s / s' - 1 = -(s'^2 - s^2) / (s' (s + s'))
    return out.addcmul_((st.normed @ ww)[None], shrink.permute(2, 0, 1)[..., None])

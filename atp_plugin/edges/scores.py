"""Per-pair edge estimates for one batch of pairs: EAP (``atp``), the QK fix for edges into queries
and keys (``atp+qk``) and EAP-IG (``ig``).

``atp``: one noise forward (no grad) and one clean forward + backward of the summed metric (pairs
are independent, so it gives every pair's gradient): Iatp(u -> v) = (u(noise) - u(clean)) . dL/d(v's
input) at the clean run, per position. ``ig``: the gradient averaged over runs whose embedding is
clean + (k/m)(noise - clean), k = 1..m (Hanna et al.'s "inputs" variant, right-endpoint rule).
``atp+qk``: for an edge into a query or key, v's q (or k) recomputed from resid + (u(noise) -
u(clean)) through ln1, W and rotary, the attention row(s) recomputed exactly through the softmax
(``engine.qk``) and dotted with G = dL/dA.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..engine.runs import run
from ..hosts import AttentionGeometry
from . import qk as qkfix
from .graph import Graph
from .model import Parts, check_structure, hook_names
from .values import ReadSum, edge_products, grad_targets, receiver_grads, receiver_hooks, sender_hooks, sender_writes

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits -> [batch]


def _gradient_run(parts: Parts, tokens: torch.Tensor, mask: torch.Tensor, metric: Metric, extra: set[str],
                  patches: dict | None = None, senders: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward + backward: hook values (detached; the senders' with ``senders``) and the
    gradients ``grad_targets`` and ``extra`` need."""
    targets = grad_targets(parts) + sorted(extra)
    capture = receiver_hooks(parts) | extra | (sender_hooks(parts) if senders else set())
    with torch.enable_grad():
        logits, values = run(parts.host, tokens, mask, capture, patches)
        grads = torch.autograd.grad(metric(logits).sum(), [values[h] for h in targets])
    return {h: v.detach() for h, v in values.items()}, dict(zip(targets, grads))


def noise_writes(parts: Parts, corrupt: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sender writes on the corrupt prompts ``[batch, pos, sender, d_model]`` (one forward, no grad)."""
    with torch.no_grad():
        _, values = run(parts.host, corrupt, mask, sender_hooks(parts))
        return sender_writes(parts, values, dtype)


def atp_batch(parts: Parts, graph: Graph, tokens: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor,
              metric: Metric, dtype: torch.dtype, *, qk: bool, check: bool = False) -> torch.Tensor:
    """Iatp (Iqk for edges into q/k with ``qk``) per pair, edge and position: ``[batch, edge, pos]``, 0
    at padding. ``check``: first check the model's structure on the clean run's first prompt."""
    noise = noise_writes(parts, corrupt, mask, dtype)
    geoms = {layer: parts.host.attention(layer) for layer in range(parts.n_layers)} if qk else {}
    extra = {h for g in geoms.values() for h in (g.q_hook, g.k_hook, g.scores_hook, g.pattern_hook)}
    values, grads = _gradient_run(parts, tokens, mask, metric, extra)
    if check:
        check_structure(parts, {h: v[:1] for h, v in values.items()}, mask[:1])
    with torch.no_grad():
        delta = (noise - sender_writes(parts, values, dtype)) * mask[:, :, None, None]
        out = edge_products(graph, delta, receiver_grads(parts, values, grads, dtype))
        for layer, geom in geoms.items():
            _qk_fix(parts, graph, layer, geom, values, grads, delta, mask, out, dtype)
    return out * mask[:, None, :]


def ig_batch(parts: Parts, graph: Graph, tokens: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor,
             metric: Metric, dtype: torch.dtype, steps: int) -> torch.Tensor:
    """Iig per pair, edge and position ``[batch, edge, pos]``: the sender's change dotted with the
    receiver's gradient averaged over ``steps`` runs along the embedding path."""
    embed = hook_names(0).resid_pre
    with torch.no_grad():
        _, noise_values = run(parts.host, corrupt, mask, sender_hooks(parts))
        _, clean_values = run(parts.host, tokens, mask, sender_hooks(parts))
        delta = (sender_writes(parts, noise_values, dtype) - sender_writes(parts, clean_values, dtype))
        delta = delta * mask[:, :, None, None]
    reads = ReadSum(parts, dtype)
    for alpha in path_points(steps):
        values, grads = _gradient_run(parts, tokens, mask, metric, set(),
                                      {embed: interpolate(noise_values[embed], alpha)}, senders=False)
        with torch.no_grad():
            reads.add(values, grads)
    with torch.no_grad():
        return edge_products(graph, delta, (r / steps for r in reads.blocks())) * mask[:, None, :]


def path_points(steps: int) -> list[float]:
    """The interpolation weights k/m, k = 1..m, of the right-endpoint rule."""
    return [k / steps for k in range(1, steps + 1)]


def interpolate(noise: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A patch setting a site to clean + alpha (noise - clean), the clean value being what flows there."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        return x + alpha * (noise.to(x.dtype) - x)
    return patch


def _qk_fix(parts: Parts, graph: Graph, layer: int, geom: AttentionGeometry, values: dict[str, torch.Tensor],
            grads: dict[str, torch.Tensor], delta: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
            dtype: torch.dtype) -> None:
    """Overwrite ``out`` ``[batch, edge, pos]`` at edges into the layer's queries and keys with Iqk.

    Every sender u before the layer at once: the change of every head's q and kv-head's k at each
    position when the residual read there gains u's change ``delta`` ``[batch, pos, sender, d]``
    (through ln1 once, W_Q and W_K in one product, rotary), then the attention rows exactly through
    the softmax, dotted with G (``edges.qk``).
    """
    h = hook_names(layer)
    n_s, n_q = graph.senders_before(2 * layer + 1), parts.n_heads
    x = values[h.resid_pre]  # [batch, pos, d_model]
    b, t = x.shape[:2]
    dn = (parts.ln1(layer, x[:, :, None] + delta[:, :, :n_s].to(x.dtype)) - parts.ln1(layer, x)[:, :, None]).to(dtype)
    w = torch.cat([parts.weights(layer, which)[0] for which in "qk"]).to(dtype)  # [n_q + n_kv, d_model, d_head]
    change = (dn @ w.permute(1, 0, 2).flatten(1)).view(b, t, -1, w.shape[2])  # [batch, pos, senders * (q + kv), d_head]
    change = parts.rotate(layer, change, mask).unflatten(2, (n_s, -1))  # [batch, pos, senders, q + kv, d_head]
    q, k = values[geom.q_hook].to(dtype), values[geom.k_hook].to(dtype)  # [batch, pos, heads, d_head]
    rw = qkfix.rows(values[geom.scores_hook].to(dtype), q, k, grads[geom.pattern_hook].to(dtype), geom)
    dq = change[:, :, :, :n_q].permute(0, 3, 2, 1, 4)  # [batch, head, senders, pos, d_head]
    # per query head: [batch, head, d_head, senders, pos]
    dk = change[:, :, :, n_q:].repeat_interleave(geom.group, dim=3).permute(0, 3, 4, 2, 1)
    for which, eff in (("q", qkfix.query_effects(rw, dq, k, geom)), ("k", qkfix.key_effects(rw, q, dk, geom))):
        rs = torch.tensor(graph.receivers_of(which, layer))
        edges = graph.receiver_start[rs][None, :] + torch.arange(n_s)[:, None]  # [senders, receivers]
        out[:, edges.flatten()] = eff.transpose(2, 3).flatten(1, 2)  # eff [batch, senders, pos, receivers]

"""The QK fix for edges: the node QK fix (``engine.qk``) for many senders at once.

An edge u -> (head h's query or key at position t) changes one query row t (one key column t) of
the receiving head's attention by u's change alone. The engine's node formulas are per changed
query/key; here every sender of a layer shares what does not depend on the sender (the clean
log-pattern, each row's top entry, G centred) and only the score changes carry a sender axis:
``[batch, head, senders, t, s]`` for queries, ``[batch, head, t, senders, s]`` for keys, computed
a chunk of senders at a time so the elementwise passes run in cache.

Same quantities as ``engine.qk.query_delta`` / ``query_effect`` and ``key_fix`` / ``key_effect``,
with the same care: each pattern change from the change of its log probability (no difference of
two softmaxes), a row's top entry through the other entries, p (e^d - 1) without overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.qk import _log1mexp
from ..hosts import AttentionGeometry

CHUNK = 1 << 19  # score entries per chunk of senders: the working set of the elementwise passes (~2 MB in float32)


def _softcapped(raw: torch.Tensor, change: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """softcap(raw + change) - softcap(raw); without soft-capping ``change`` itself (the scores are
    then bilinear, so the change of q . k / scale is the score change)."""
    if geom.softcap is None:
        return change
    cap = geom.softcap
    return torch.tanh((raw + change) / cap).sub_(torch.tanh(raw / cap)).mul_(cap)


def _exp_normal(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place, with results below tiny / eps (the smallest normal number over the
    machine epsilon: ~1e-31 in float32, ~1e-292 in float64; exp(-inf) included) taken as that. An
    absolute change of at most that keeps denormal numbers (~30x slower per entry on CPUs; masked
    and far-off entries land there) out of the exponentials and of their products with factors
    down to eps."""
    info = torch.finfo(x.dtype)
    return x.clamp_(min=math.log(info.tiny / info.eps)).exp_()


def _signed_expm1(r: torch.Tensor) -> torch.Tensor:
    """sign(r) (1 - e^-|r|), never overflowing: ``r``'s shape."""
    return torch.expm1(r.abs().neg_()).neg_().copysign_(r)


@dataclass(frozen=True)
class Rows:
    """One layer's clean attention as both fixes need it, ``[batch, head, t, s]`` unless noted."""

    raw: torch.Tensor       # softcap's argument q . k / scale (soft-capped models only; else the scores)
    logp: torch.Tensor      # log A: -inf at masked entries and in fully masked rows
    pattern: torch.Tensor   # A
    top: torch.Tensor       # [batch, head, t, 1] each row's top entry
    G: torch.Tensor         # dL/dA


def rows(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, G: torch.Tensor,
         geom: AttentionGeometry) -> Rows:
    """What every sender's fix of one layer shares, computed once: from ``scores``/``G`` ``[batch,
    head, t, s]`` (masked scores -inf), clean ``q`` ``[batch, pos, head, d_head]`` and ``k``
    ``[batch, pos, kv_head, d_head]``."""
    raw = scores
    if geom.softcap is not None:
        raw = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(geom.group, dim=2)) / geom.scale
    logp = torch.log_softmax(scores, dim=-1).nan_to_num_(nan=float("-inf"))  # fully masked rows: -inf
    return Rows(raw, logp, logp.exp(), scores.argmax(-1, keepdim=True), G)


def query_effects(rw: Rows, dq: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """Iqk of every (sender, query head, position): sum_s (A'_ts - A_ts) G_ts with query t of head
    h moved by ``dq`` ``[batch, head, senders, t, d_head]``, keys clean; ``[batch, senders, t, head]``.

    With r = log A' - log A = d - log sum_s A e^d (d the score change), A' - A = sign(r) max(A, A')
    (1 - e^-|r|) as ``query_delta``; the top entry's change is minus the others' sum, so the row's
    effect is sum over the others of (A'_s - A_s) (G_s - G_top).
    """
    kk = k.repeat_interleave(geom.group, dim=2).permute(0, 2, 3, 1) / geom.scale  # [batch, head, d_head, s]
    g_top = rw.G - rw.G.gather(-1, rw.top)
    g_top = g_top.scatter_(-1, rw.top, 0.0).masked_fill_(rw.logp == float("-inf"), 0.0)[:, :, None]
    logp, pattern, raw = rw.logp[:, :, None], rw.pattern[:, :, None], rw.raw[:, :, None]  # [batch, head, 1, t, s]
    b, h, n, t, e = dq.shape
    out = []
    for chunk in dq.split(max(1, CHUNK // (b * h * t * t)), dim=2):
        u = chunk.shape[2]
        d = _softcapped(raw, torch.matmul(chunk.reshape(b, h, u * t, e), kk).view(b, h, u, t, -1), geom)
        new = logp + d  # [batch, head, senders, t, s]: log A + d
        top = new.amax(-1, keepdim=True)
        w = _exp_normal(new.sub_(top))
        z = w.sum(-1, keepdim=True)
        changed = torch.maximum(w.div_(z), pattern)  # max(A', A)
        r = d.sub_(z.log_().add_(top))  # log A' - log A
        out.append((_signed_expm1(r).mul_(changed).mul_(g_top)).sum(-1))  # [batch, head, senders, t]
    return torch.cat(out, dim=2).nan_to_num_(nan=0.0).permute(0, 2, 3, 1)  # fully masked rows: 0


def key_effects(rw: Rows, q: torch.Tensor, dk: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """Iqk of every (sender, kv-head, key position), summed over query rows and the heads the kv-head
    feeds: key s moved by ``dk`` ``[batch, head, d_head, senders, s]`` (per query head), queries
    clean; ``[batch, senders, s, kv_head]``.

    ``key_fix``'s coefficients: row t changes by c_ts (G_ts - sum_s' A_ts' G_ts') with c = x / (1 + x),
    x = p (e^d - 1) taken without overflow, except at the row's top entry, where it changes by
    c_top (G_top - mean of G under the other entries) with c_top from log space.
    """
    G, top, logp = rw.G, rw.top, rw.logp
    masked = logp == float("-inf")
    centred = (G - (rw.pattern * G).sum(-1, keepdim=True)).scatter_(-1, top, 0.0).masked_fill_(masked, 0.0)
    others = logp.scatter(-1, top, float("-inf"))
    lse_others = torch.logsumexp(others, dim=-1, keepdim=True)  # log(1 - p_top) [batch, head, t, 1]
    rest = (others - lse_others).exp_().nan_to_num_(nan=0.0)  # each row's softmax without its top entry
    at_top = G.gather(-1, top) - (rest * G).sum(-1, keepdim=True)  # [batch, head, t, 1]
    logp_top = logp.gather(-1, top)
    onehot = torch.zeros_like(G).scatter_(-1, top, 1.0)  # [batch, head, t, s]: the top entries
    qq = q.permute(0, 2, 1, 3) / geom.scale  # [batch, head, t, d_head]
    b, h, e, n, s = dk.shape
    logp_, centred_, raw = logp[:, :, :, None], centred[:, :, :, None], rw.raw[:, :, :, None]  # [b, h, t, 1, s]
    out = []
    for chunk in dk.split(max(1, CHUNK // (b * h * s * s)), dim=3):
        u = chunk.shape[3]
        d = _softcapped(raw, torch.matmul(qq, chunk.reshape(b, h, e, u * s)).view(b, h, -1, u, s), geom)
        # x = p (e^d - 1) = sign(d) exp(log p + max(d, 0)) (1 - e^-|d|); x / (1 + x) is 1 where x overflowed
        x = _signed_expm1(d).mul_(_exp_normal(d.clamp(min=0).add_(logp_)))
        coeff = x.div_(x + 1).nan_to_num_(nan=1.0)  # [batch, head, t, senders, s]
        main = (coeff.mul_(centred_)).sum(2)  # [batch, head, senders, s]
        d_top = d.gather(-1, top[:, :, :, None].expand(-1, -1, -1, u, -1))[..., 0]  # [batch, head, t, senders]
        log_z = torch.logaddexp(lse_others, logp_top + d_top)  # log(1 - p + p e^d)
        c_top = torch.sign(d_top) * torch.exp(logp_top + torch.relu(d_top) + _log1mexp(d_top.abs()) + lse_others
                                             - log_z)
        c_top = torch.where(torch.isfinite(logp_top), c_top, torch.zeros_like(c_top))  # fully masked rows
        main += torch.einsum("bhtu,bhts->bhus", c_top * at_top, onehot)
        out.append(main)
    per_head = torch.cat(out, dim=2)  # [batch, head, senders, s]
    return per_head.unflatten(1, (-1, geom.group)).sum(2).permute(0, 2, 3, 1)

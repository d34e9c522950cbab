"""The QK fix (AtP* part 1): attention-pattern changes from patching queries or keys, computed
exactly through the softmax and linearized only after it, for nodes and for edges by one
implementation.

An edge u -> (head h's query or key at position t) changes query row t (key column t) of that
head's attention by u's change alone; a query or key node is the one-sender case, its own change
q_noise - q (k_noise - k). So every formula here has a sender axis: ``rows`` computes what every
sender of a layer (or of a block of its query rows) shares, once; ``query_changes`` and
``key_changes`` give the pattern changes a chunk of senders at a time (the elementwise passes run
in cache); ``query_weights`` and ``key_weights`` are what dL/dA contributes, once per layer. The
edge fix (``query_effects``, ``key_effects``: ``edges/scores.py``) runs them with many senders;
the node fix (``node_fix``, ``query_effect``, ``key_effect``: ``engine/estimates.py``) with one,
block by block of query rows, and GradDrop keeps it in a factored form (``keep``).

One numerical contract for both:

- each entry's change comes from the change of its log probability, never from a difference of
  two softmaxes (that loses every digit of a 1e-17 change next to a 1);
- a row's top (largest) entry, the only one whose A may be within 1e-17 of 1 (where log A carries
  no digits of 1 - A), is reached through the others: minus their sum for a query, a factor
  (1 - A_top) taken from their log-sum-exp for a key;
- p (e^d - 1) is formed without e^d overflowing and keeps p e^d where p alone underflows;
- below float64, exponentials are floored at tiny / eps (``_exp_normal``): denormal numbers, exp(-inf)
  and underflows take slow paths on CPUs (~20x, ~4x), and float32 reaches them at logit gaps of ~87;
- masked entries are no nodes, and a fully masked (padding) row changes by 0;
- soft-capped scores change by softcap(raw + change) - softcap(raw).

Shapes: q, k are ``[batch, pos, head, d_head]`` (k may have fewer kv-heads); scores, patterns and
their gradients are ``[batch, head, query_pos, key_pos]``, masked entries ``-inf`` in scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UnsupportedModelError
from ..hosts import AttentionGeometry

CHUNK = 1 << 19  # score entries per chunk of senders: the working set of the elementwise passes (~2 MB in float32)


def fixable(geom: AttentionGeometry, instead: str) -> AttentionGeometry:
    """``geom`` where the QK fix can serve its layer, else an ``UnsupportedModelError`` ending with
    ``instead`` (what to use). The fix recomputes scores from q and k, for nodes and for edges alike,
    so a bias the model adds to them (``score_bias``: ALiBi) is refused by both."""
    if geom.score_bias is not None:
        raise UnsupportedModelError(f"the QK fix cannot handle {geom.score_bias} in this model: it recomputes the "
                                    f"scores from q and k; {instead}")
    return geom


def unmasked(scores: torch.Tensor) -> torch.Tensor:
    """True where a model's attention score ``[batch, head, t, s]`` is not masked: masks are -inf or
    the dtype's least value (some models add that instead of -inf)."""
    return scores > torch.finfo(scores.dtype).min / 2


def row_blocks(seen: torch.Tensor, n_blocks: int) -> list[tuple[slice, int]]:
    """``n_blocks`` blocks of query rows (at most one per row), each with the number of leading
    keys any of its rows sees, from ``seen`` ``[batch, head (or 1), t, s]``, True where a score is
    not masked (at least 1): beyond it every entry is masked, so a causal model's blocks cover about
    its triangle (with 8 blocks, 56% of the square)."""
    t = seen.shape[2]
    n = min(n_blocks, t)
    bounds = [t * i // n for i in range(n + 1)]  # n blocks whose sizes differ by at most one row
    seen = seen.flatten(0, 1).any(0)  # [t, s]
    last = (seen * torch.arange(1, seen.shape[1] + 1, device=seen.device)).amax(-1)  # [t]: 1 + last key seen
    keys = torch.stack([last[a:b].max() for a, b in zip(bounds, bounds[1:])]).clamp(min=1).tolist()  # one sync
    return [(slice(a, b), k) for a, b, k in zip(bounds, bounds[1:], keys)]


def scores(q: torch.Tensor, k: torch.Tensor, seen: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """The attention scores ``[batch, head, t, s]`` of queries ``q`` and keys ``k`` as the model forms
    them (``AttentionGeometry``), ``-inf`` where ``seen`` (broadcast to that shape) is False."""
    return _raw_scores(q, k, geom).masked_fill_(~seen, float("-inf"))


def _raw_scores(q: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """softcap(q . k / scale) for every query/key pair: ``[batch, head, t, s]``."""
    raw = _products(q, k, geom)
    if geom.softcap is not None:
        raw = geom.softcap * torch.tanh(raw / geom.softcap)
    return raw


def _products(q: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """q . k / scale for every query/key pair (softcap's argument): ``[batch, head, t, s]``."""
    return torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(geom.group, dim=2)) / geom.scale


def _softcapped(raw: torch.Tensor, change: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """The score change softcap(raw + change) - softcap(raw); without soft-capping ``change``
    itself (the scores are then bilinear, so the change of q . k / scale is the score change: one
    product of the difference, no cancellation between two large scores)."""
    if geom.softcap is None:
        return change
    cap = geom.softcap
    return torch.tanh((raw + change) / cap).sub_(torch.tanh(raw / cap)).mul_(cap)


def _exp_normal(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place; below float64, results under tiny / eps (the smallest normal number over
    the machine epsilon: ~1e-31 in float32) are taken as that, exp(-inf) (masked entries) included,
    so callers zero what must be 0. An absolute change of at most that keeps denormal numbers out of
    the exponentials and of their products with factors down to eps, and the exponentials off their
    slow paths: on CPUs a denormal result costs ~20x a normal one, an underflow to 0 or exp(-inf)
    ~4x (float32 reaches them at logit gaps of ~87; masked entries always). float64 reaches
    denormals only at logit gaps of ~708: there every entry keeps its relative accuracy, down to the
    smallest subnormal (tests/test_qk_numerics.py)."""
    if x.dtype == torch.float64:
        return x.exp_()
    info = torch.finfo(x.dtype)
    return x.clamp_(min=math.log(info.tiny / info.eps)).exp_()


def _signed_expm1(r: torch.Tensor) -> torch.Tensor:
    """sign(r) (1 - e^-|r|), never overflowing: ``r``'s shape."""
    return torch.expm1(r.abs().neg_()).neg_().copysign_(r)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, accurate at both ends."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


@dataclass(frozen=True)
class Rows:
    """The clean attention of one layer (or of a block of its query rows, on the keys they see) as
    every sender's fix needs it: ``[batch, head, t, s]`` unless noted."""

    raw: torch.Tensor       # softcap's argument q . k / scale (soft-capped models only; else the scores)
    logp: torch.Tensor      # log A: -inf at masked entries and in fully masked rows
    pattern: torch.Tensor   # A
    top: torch.Tensor       # [batch, head, t, 1] each row's top entry
    skip: torch.Tensor      # True at masked entries and at each row's top: what the others' formulas skip
    log_rest: torch.Tensor  # [batch, head, t, 1] log(1 - A_top) from the other entries' log-sum-exp


def rows(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry,
         pattern: torch.Tensor | None = None) -> Rows:
    """What every sender's fix of one layer (block) shares, computed once: from ``scores`` ``[batch,
    head, t, s]`` (masked scores -inf), clean ``q`` ``[batch, t, head, d_head]`` and ``k`` ``[batch,
    s, kv_head, d_head]``; ``pattern``: A where the caller has it from the same scores (else exp(log A))."""
    raw = scores if geom.softcap is None else _products(q, k, geom)
    ninf = float("-inf")
    # fully masked rows: -inf (NaN from the softmax); masked entries stay -inf (nan_to_num's default
    # would make them the least finite number, which exp and the masks below do not treat as masked)
    logp = torch.log_softmax(scores, dim=-1).nan_to_num_(nan=ninf, neginf=ninf)
    top = scores.argmax(-1, keepdim=True)
    skip = (logp == ninf).scatter_(-1, top, True)
    log_rest = torch.logsumexp(logp.scatter(-1, top, ninf), dim=-1, keepdim=True)  # -inf in one-key rows
    return Rows(raw, logp, logp.exp() if pattern is None else pattern, top, skip, log_rest)


def _others(rw: Rows, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, head, t, s]`` with each row's top entry and the masked entries set to 0, in place."""
    return x.masked_fill_(rw.skip, 0.0)


def _rest(rw: Rows) -> torch.Tensor:
    """Each row's softmax without its top entry ``[batch, head, t, s]`` (0 in a row with one key)."""
    return _others(rw, _exp_normal(rw.logp - rw.log_rest))


def _per_kv_head(per_head: torch.Tensor, group: int) -> torch.Tensor:
    """``[batch, head, senders, s]`` summed over the heads each kv-head feeds: ``[batch, senders, s,
    kv_head]``."""
    return per_head.unflatten(1, (-1, group)).sum(2).permute(0, 2, 3, 1)


# --- queries -------------------------------------------------------------------------------------


def query_changes(rw: Rows, dq: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry) -> Iterator[torch.Tensor]:
    """A'_ts - A_ts for every sender, a chunk of senders at a time ``[batch, head, senders, t, s]``:
    query t of head h moved by ``dq`` ``[batch, head, senders, t, d_head]``, keys ``k`` ``[batch, s,
    kv_head, d_head]`` clean.

    With d the score change and r = log A' - log A = d - log sum_s A e^d, each entry is sign(r)
    max(A, A') (1 - e^-|r|), i.e. A (e^r - 1) where it falls and A' (1 - e^-r) where it rises:
    accurate relative to the entry and never overflowing (a difference of two softmaxes loses every
    digit of a 1e-17 change). Exact at every entry but each row's top and the masked ones (NaN in
    fully masked rows): the top's change is minus the sum of the others' (the row sums to 1 before
    and after), so contract with weights that are 0 there (``query_weights``) or complete the row
    (``query_delta``). d is the change of softcap(q . k / scale) where scores are soft-capped, and
    the exponentials go through ``_exp_normal`` (no denormal numbers below float64).
    """
    kk = k.repeat_interleave(geom.group, dim=2).permute(0, 2, 3, 1) / geom.scale  # [batch, head, d_head, s]
    logp, pattern, raw = rw.logp[:, :, None], rw.pattern[:, :, None], rw.raw[:, :, None]  # [batch, head, 1, t, s]
    b, h, n, t, e = dq.shape
    s = kk.shape[-1]
    for chunk in dq.split(max(1, CHUNK // (b * h * t * s)), dim=2):
        u = chunk.shape[2]
        still = (chunk == 0).all(-1, keepdim=True)  # [batch, head, senders, t, 1]: rows whose query does not move
        d = _softcapped(raw, torch.matmul(chunk.reshape(b, h, u * t, e), kk).view(b, h, u, t, s), geom)
        new = logp + d  # [batch, head, senders, t, s]: log A + d
        top = new.amax(-1, keepdim=True)
        w = _exp_normal(new.sub_(top))
        z = w.sum(-1, keepdim=True)
        changed = torch.maximum(w.div_(z), pattern)  # max(A', A)
        # log A' - log A; exactly 0 where the query does not move (log z + top is log sum_s A_s, which
        # rounds off 0: a node that does not change must score exactly 0)
        r = d.sub_(z.log_().add_(top)).masked_fill_(still, 0.0)
        yield _signed_expm1(r).mul_(changed)


def query_weights(rw: Rows, G: torch.Tensor) -> torch.Tensor:
    """What dL/dA ``G`` ``[batch, head, t, s]`` weighs each query change with: G_ts - G_t,top, 0 at
    the top and masked entries (the top's change is minus the others' sum): ``[batch, head, 1, t, s]``."""
    return _others(rw, G - G.gather(-1, rw.top))[:, :, None]


def _query_sums(delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_s (A'_ts - A_ts) G_ts from ``query_changes``' ``delta`` (overwritten) and ``query_weights``:
    ``[batch, senders, t, head]``, 0 in fully masked rows."""
    return delta.mul_(weights).sum(-1).nan_to_num_(nan=0.0).permute(0, 2, 3, 1)


def query_effects(rw: Rows, dq: torch.Tensor, k: torch.Tensor, G: torch.Tensor,
                  geom: AttentionGeometry) -> torch.Tensor:
    """Iqk of every (sender, query head, position), sum_s (A'_ts - A_ts) G_ts with query t moved by
    ``dq`` (``query_changes``) and G = dL/dA ``[batch, head, t, s]``: ``[batch, senders, t, head]``."""
    weights = query_weights(rw, G)
    return torch.cat([_query_sums(delta, weights) for delta in query_changes(rw, dq, k, geom)], dim=1)


# --- keys ----------------------------------------------------------------------------------------


def key_changes(rw: Rows, q: torch.Tensor, dk: torch.Tensor, geom: AttentionGeometry
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The coefficients of every sender's key fix, a chunk of senders at a time: key s moved by
    ``dk`` ``[batch, head, d_head, senders, s]`` (per query head), queries ``q`` ``[batch, t, head,
    d_head]`` clean. Yields ``coeff`` ``[batch, head, t, senders, s]`` and ``coeff_top`` ``[batch,
    head, t, senders]``.

    With p = A_ts, d the change of logit s, Z = 1 + p (e^d - 1), row t changes by sum_s' (A'_ts' -
    A_ts') G_ts' = [p (e^d - 1) / Z] (G_ts - sum_s' A_ts' G_ts'). Every entry but a row's top has
    p <= 1/2, so Z >= 1/2: there ``coeff`` is x / (1 + x), x = p (e^d - 1) = sign(d) exp(log p +
    max(d, 0)) (1 - e^-|d|) (no overflow of e^d, p e^d kept where p underflows), 1 where x
    overflowed. At the top entry p (e^d - 1) / Z overflows as p -> 1 with d << 0 while the bracket
    -> 0, so there the bracket is written (1 - p) (G_ts - Gbar_ts), Gbar_ts the mean of G over the
    other keys under their own softmax, and ``coeff_top`` = p (e^d - 1) (1 - p) / Z is computed in
    log space: log Z = logaddexp(log(1 - p), log p + d), log(1 - p) = ``Rows.log_rest`` (no
    cancellation as p -> 1). ``coeff`` is exact at every entry but the top and the masked ones:
    contract with weights that are 0 there (``key_weights``). A row with one key cannot change,
    nor can a fully masked one: ``coeff_top`` 0. d is the change of softcap(q . k / scale) where
    scores are soft-capped, and the exponentials go through ``_exp_normal``.
    """
    qq = q.permute(0, 2, 1, 3) / geom.scale  # [batch, head, t, d_head]
    b, h, e, n, s = dk.shape
    t = qq.shape[2]
    logp, raw = rw.logp[:, :, :, None], rw.raw[:, :, :, None]  # [batch, head, t, 1, s]
    logp_top = rw.logp.gather(-1, rw.top)  # [batch, head, t, 1]
    live = torch.isfinite(logp_top)  # False in fully masked rows
    for chunk in dk.split(max(1, CHUNK // (b * h * t * s)), dim=3):
        u = chunk.shape[3]
        d = _softcapped(raw, torch.matmul(qq, chunk.reshape(b, h, e, u * s)).view(b, h, t, u, s), geom)
        x = _signed_expm1(d).mul_(_exp_normal(d.clamp(min=0).add_(logp)))
        coeff = x.div_(x + 1).nan_to_num_(nan=1.0)  # [batch, head, t, senders, s]
        d_top = d.gather(-1, rw.top[:, :, :, None].expand(-1, -1, -1, u, -1))[..., 0]  # [batch, head, t, senders]
        log_z = torch.logaddexp(rw.log_rest, logp_top + d_top)  # log(1 - p + p e^d)
        coeff_top = torch.sign(d_top) * torch.exp(logp_top + torch.relu(d_top) + _log1mexp(d_top.abs())
                                                  + rw.log_rest - log_z)
        yield coeff, torch.where(live, coeff_top, torch.zeros_like(coeff_top))


def key_weights(rw: Rows, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What dL/dA ``G`` ``[batch, head, t, s]`` weighs the key coefficients with: G centred on its
    pattern-weighted mean, 0 at the top and masked entries, ``[batch, head, t, 1, s]``, and at each
    row's top entry G_top minus the mean of G under the other entries' softmax, ``[batch, head, t, 1]``."""
    centred = _others(rw, G - (rw.pattern * G).sum(-1, keepdim=True))  # [batch, head, t, s]
    return centred[:, :, :, None], G.gather(-1, rw.top) - (_rest(rw) * G).sum(-1, keepdim=True)


def _key_sums(product: torch.Tensor, coeff_top: torch.Tensor, at_top: torch.Tensor, top: torch.Tensor
              ) -> torch.Tensor:
    """Every sender's change summed over query rows, per query head ``[batch, head, senders, s]``, from
    the product of ``key_changes``' coeff and ``key_weights``' centred ``[batch, head, t, senders, s]``
    (0 where coeff is not exact: either factor may carry those zeros), its ``coeff_top`` ``[batch,
    head, t, senders]`` and the weights' ``at_top`` ``[batch, head, t, 1]``."""
    per_key = product.sum(2)  # [batch, head, senders, s]
    at = (coeff_top * at_top).transpose(2, 3)  # [batch, head, senders, t]
    return per_key.scatter_add_(-1, top.squeeze(-1)[:, :, None].expand(-1, -1, at.shape[2], -1), at)


def key_effects(rw: Rows, q: torch.Tensor, dk: torch.Tensor, G: torch.Tensor,
                geom: AttentionGeometry) -> torch.Tensor:
    """Iqk of every (sender, kv-head, key position), summed over query rows and the heads the kv-head
    feeds, with key s moved by ``dk`` (``key_changes``) and G = dL/dA ``[batch, head, t, s]``:
    ``[batch, senders, s, kv_head]``."""
    centred, at_top = key_weights(rw, G)
    per_head = [_key_sums(coeff.mul_(centred), coeff_top, at_top, rw.top)
                for coeff, coeff_top in key_changes(rw, q, dk, geom)]
    return _per_kv_head(torch.cat(per_head, dim=2), geom.group)


# --- nodes: one sender, the node's own change ----------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """The QK fix of one layer's own query and key nodes (or a block of its query rows): the sender
    functions above with one sender, each node's own change. Tensors ``[batch, head, ...]``."""

    rows: Rows
    delta: torch.Tensor | None      # [batch, head, 1, t, s] query_changes; None without query nodes
    coeff: torch.Tensor | None      # [batch, head, t, 1, s] key_changes; None without key nodes
    coeff_top: torch.Tensor | None  # [batch, head, t, 1]


def node_fix(rw: Rows, q: torch.Tensor, k: torch.Tensor, q_noise: torch.Tensor | None,
             k_noise: torch.Tensor | None, geom: AttentionGeometry) -> Fix:
    """The fix of every query node (with ``q_noise``) and key node (with ``k_noise``) of ``rw``'s
    rows: query t moved by q_noise_t - q_t, key s by k_noise_s - k_s (q, k ``[batch, pos, (kv-)head,
    d_head]`` on ``rw``'s rows and keys)."""
    delta = coeff = coeff_top = None
    if q_noise is not None:
        dq = (q_noise - q).transpose(1, 2)[:, :, None]  # [batch, head, 1, t, d_head]
        delta = next(query_changes(rw, dq, k, geom))
    if k_noise is not None:
        dk = (k_noise - k).repeat_interleave(geom.group, dim=2).permute(0, 2, 3, 1)[:, :, :, None]  # [b, h, e, 1, s]
        coeff, coeff_top = next(key_changes(rw, q, dk, geom))
    return Fix(rw, delta, coeff, coeff_top)


def query_effect(fix: Fix, G: torch.Tensor) -> torch.Tensor:
    """Iqk of every query node, sum_s (A'_ts - A_ts) G_ts: ``[batch, t, head]`` (``fix.delta`` is
    used up)."""
    assert fix.delta is not None
    return _query_sums(fix.delta, query_weights(fix.rows, G))[:, 0]


def key_effect(fix: Fix, G: torch.Tensor, group: int) -> torch.Tensor:
    """Iqk of every key node, summed over query rows and the heads its kv-head feeds:
    ``[batch, s, kv_head]`` (GradDrop's variants use ``kept_key_effect``)."""
    assert fix.coeff is not None and fix.coeff_top is not None
    centred, at_top = key_weights(fix.rows, G)
    return _per_kv_head(_key_sums(fix.coeff * centred, fix.coeff_top, at_top, fix.rows.top), group)[:, 0]


def _complete(rw: Rows, delta: torch.Tensor) -> torch.Tensor:
    """A' - A ``[batch, head, t, s]`` from ``query_changes``' one-sender ``delta`` (completed in
    place: still exact where it was): 0 at masked entries and in fully masked rows, each row's top
    entry minus the sum of the others."""
    delta = _others(rw, delta)
    return delta.scatter_(-1, rw.top, -delta.sum(-1, keepdim=True))


def query_delta(scores: torch.Tensor, q: torch.Tensor, q_noise: torch.Tensor, k: torch.Tensor,
                geom: AttentionGeometry) -> torch.Tensor:
    """A'_t - A_t for every query row t, with only q_t patched (keys clean): ``[batch, head, t, s]``
    (``query_changes`` with one sender, the row completed)."""
    rw = rows(scores, q, k, geom)
    fix = node_fix(rw, q, k, q_noise, None, geom)
    assert fix.delta is not None
    return _complete(rw, fix.delta[:, :, 0])


def key_fix(scores: torch.Tensor, pattern: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            k_noise: torch.Tensor, geom: AttentionGeometry) -> Fix:
    """The fix of every key node from the clean ``scores`` and ``pattern`` (for ``key_effect``)."""
    return node_fix(rows(scores, q, k, geom, pattern), q, k, None, k_noise, geom)


@dataclass(frozen=True)
class KeptFix:
    """One layer's QK fix as GradDrop keeps it for its variants, ``[batch, head, t, d_head]``
    unless noted. dL/dA = dL/dz v^T (``AttentionGeometry``), so a query row's change needs delta
    only through delta v, and a key's top-entry term needs the other entries' softmax only through
    rest v: one ``[batch, head, t, s]`` tensor (the key coefficients) instead of three."""

    delta_v: torch.Tensor | None  # (A' - A) v per query row; None without query nodes
    coeff: torch.Tensor | None    # [batch, head, t, 1, s] Fix.coeff, 0 at top and masked entries; None without key
    top: torch.Tensor | None      # [batch, head, t, 1]                                 nodes (then so are the rest)
    coeff_top: torch.Tensor | None  # [batch, head, t, 1]
    top_v: torch.Tensor | None    # v at each row's top entry minus rest v


def keep(fix: Fix, v: torch.Tensor) -> KeptFix:
    """The factored form of a layer's fix for the values ``v`` ``[batch, pos, head, d_head]``
    (kv-heads already repeated to the query heads). Call it before ``query_effect`` uses up the fix."""
    rw, v = fix.rows, v.transpose(1, 2)  # [batch, head, s, d_head]
    delta_v = _complete(rw, fix.delta[:, :, 0]) @ v if fix.delta is not None else None
    if fix.coeff is None:
        return KeptFix(delta_v, None, None, None, None)
    at_top = v.gather(2, rw.top.expand(-1, -1, -1, v.shape[-1]))  # [batch, head, t, d_head]
    coeff = _others(rw, fix.coeff[:, :, :, 0])[:, :, :, None]  # in place: still exact where it was
    return KeptFix(delta_v, coeff, rw.top, fix.coeff_top, at_top - _rest(rw) @ v)


def kept_query_effect(kept: KeptFix, grad_z: torch.Tensor) -> torch.Tensor:
    """``query_effect`` from the kept fix and dL/dz ``[batch, t, head, d_head]``: ``[batch, t, head]``."""
    assert kept.delta_v is not None
    return torch.einsum("bhtd,bthd->bth", kept.delta_v, grad_z)


def kept_key_effect(kept: KeptFix, grad_pattern: torch.Tensor, grad_z: torch.Tensor, z: torch.Tensor,
                    group: int) -> torch.Tensor:
    """``key_effect`` from the kept fix, G and dL/dz, z ``[batch, t, head, d_head]``: sum_s' A_ts' G_ts'
    is dL/dz_t . z_t, and the top entry's G_ts - sum_s' rest_ts' G_ts' is dL/dz_t . top_v_t."""
    assert kept.coeff is not None and kept.top is not None and kept.coeff_top is not None and kept.top_v is not None
    gz = grad_z.transpose(1, 2)  # [batch, head, t, d_head]
    centred = grad_pattern - (gz * z.transpose(1, 2)).sum(-1, keepdim=True)  # [batch, head, t, s]
    at_top = (gz * kept.top_v).sum(-1, keepdim=True)  # [batch, head, t, 1]
    product = centred[:, :, :, None].mul_(kept.coeff)  # [batch, head, t, 1, s]; coeff is 0 at the top and masked
    return _per_kv_head(_key_sums(product, kept.coeff_top, at_top, kept.top), group)[:, 0]

"""The QK fix (AtP* part 1): attention-pattern changes from patching one query or one key,
computed exactly through the softmax and linearized only after it.

Shapes: q, k are ``[batch, pos, head, d_head]`` (k may have fewer kv-heads); scores, patterns and
their gradients are ``[batch, head, query_pos, key_pos]``, masked entries ``-inf`` in scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..hosts import AttentionGeometry


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
    k = k.repeat_interleave(geom.group, dim=2)  # [batch, pos, head, d_head]
    raw = torch.einsum("bthd,bshd->bhts", q, k) / geom.scale
    if geom.softcap is not None:
        raw = geom.softcap * torch.tanh(raw / geom.softcap)
    return raw


def _raw_change(q: torch.Tensor, k: torch.Tensor, q_new: torch.Tensor, k_new: torch.Tensor,
                geom: AttentionGeometry) -> torch.Tensor:
    """softcap(q_new . k_new / scale) - softcap(q . k / scale) where only q or only k changes:
    ``[batch, head, t, s]``. Without soft-capping the scores are bilinear, so one product of the
    difference does (cheaper, and no cancellation between two large scores)."""
    if geom.softcap is None:
        return _raw_scores(q_new - q, k, geom) if k_new is k else _raw_scores(q, k_new - k, geom)
    return _raw_scores(q_new, k_new, geom) - _raw_scores(q, k, geom)


def query_delta(scores: torch.Tensor, q: torch.Tensor, q_noise: torch.Tensor, k: torch.Tensor,
                geom: AttentionGeometry) -> torch.Tensor:
    """A'_t - A_t for every query row t, with only q_t patched (keys clean): ``[batch, head, t, s]``.

    The new scores are the clean ones plus the change in softcap(q.k/scale), so masks carry over
    unchanged. Each entry is computed from the change of its log
    probability, r = log A' - log A: sign(r) max(A, A') (1 - e^-|r|), i.e. A (e^r - 1) where it
    falls and A' (1 - e^-r) where it rises, accurate relative to the entry and never overflowing (a
    difference of two softmaxes loses every digit of a 1e-17 change). Except at the row's top
    entry, where A may be within 1e-17 of 1 and log A carries no digits of 1 - A: its change is
    minus the sum of the others' (the row sums to 1 before and after).
    """
    old = torch.log_softmax(scores, dim=-1)
    new = torch.log_softmax(scores + _raw_change(q, k, q_noise, k, geom), dim=-1)
    r = new - old
    delta = torch.maximum(old, new).exp_().mul_(torch.expm1(-r.abs()).neg_().copysign_(r))
    delta.nan_to_num_(nan=0.0)  # masked entries (-inf - -inf), fully masked (padding) rows
    top = scores.argmax(-1, keepdim=True)  # [batch, head, t, 1]
    return delta.scatter_(-1, top, -delta.scatter(-1, top, 0.0).sum(-1, keepdim=True))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, accurate at both ends."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


@dataclass(frozen=True)
class KeyFix:
    """What the key-node estimate of one layer needs besides G (``key_fix``); ``[batch, head, t, s]``
    unless noted. The top entry of a row is its largest, the only one whose A_ts can be near 1."""

    coeff: torch.Tensor      # p (e^d - 1) / Z, 0 at each row's top entry and at masked entries
    top: torch.Tensor        # [batch, head, t, 1] index of each row's top entry
    coeff_top: torch.Tensor  # [batch, head, t, 1] p (e^d - 1) (1 - p) / Z at the top entry
    pattern: torch.Tensor    # A
    rest: torch.Tensor       # each row's softmax without its top entry (0 in a row with one key)


def key_fix(scores: torch.Tensor, pattern: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            k_noise: torch.Tensor, geom: AttentionGeometry) -> KeyFix:
    """Coefficients of the key-node estimate for every query row t and key s, where p = A_ts,
    d = the change of logit s when only key s is patched, Z = 1 + p (e^d - 1).

    Row t changes by sum_s' (A'_ts' - A_ts') G_ts' = [p (e^d - 1) / Z] (G_ts - sum_s' A_ts' G_ts').
    Every entry but a row's top has p <= 1/2, so Z >= 1/2: there the coefficient is x / (1 + x)
    with x = p (e^d - 1), taken from log p when d > 0 (p may underflow where p e^d does not). At
    the top entry p (e^d - 1) / Z overflows as p -> 1 with d << 0 while the bracket -> 0, so there
    the bracket is written (1 - p) (G_ts - Gbar_ts), Gbar_ts the mean of G over the other keys
    under ``rest``, and (1 - p) moves into ``coeff_top``, computed in log space: log Z =
    logaddexp(log(1 - p), log p + d), log(1 - p) from the sum of the other entries (no
    cancellation as p -> 1). A row with one key cannot change: 0.
    """
    d = _raw_change(q, k, q, k_noise, geom)
    top = scores.argmax(dim=-1, keepdim=True)  # [batch, head, t, 1]
    others = scores.scatter(-1, top, float("-inf"))
    lse_others = torch.logsumexp(others, dim=-1, keepdim=True)
    lse = torch.logaddexp(scores.gather(-1, top), lse_others)
    logp = scores - lse
    rest = others.sub_(lse_others).exp_().nan_to_num_(nan=0.0)  # 0 in one-key rows

    # x = p (e^d - 1) = sign(d) exp(log p + max(d, 0)) (1 - e^-|d|): no overflow of e^d, p e^d kept
    # where p underflows; x / (1 + x) is 1 where x overflowed (inf / inf); masked entries are no nodes
    x = torch.expm1(d.abs().neg_()).neg_().copysign_(d).mul_(d.clamp(min=0).add_(logp).exp_())
    coeff = x.div_(x + 1).nan_to_num_(nan=1.0).masked_fill_(~torch.isfinite(scores), 0.0).scatter_(-1, top, 0.0)

    logp_top, d_top, log_1mp = logp.gather(-1, top), d.gather(-1, top), lse_others - lse  # [batch, head, t, 1]
    log_z = torch.logaddexp(log_1mp, logp_top + d_top)
    log_abs_expm1 = torch.relu(d_top) + _log1mexp(d_top.abs())  # log|e^d - 1|
    coeff_top = torch.sign(d_top) * torch.exp(logp_top + log_abs_expm1 + log_1mp - log_z)
    coeff_top = torch.where(torch.isfinite(logp_top), coeff_top, torch.zeros_like(coeff_top))  # fully masked rows
    return KeyFix(coeff, top, coeff_top, pattern, rest)


def query_effect(delta: torch.Tensor, grad_pattern: torch.Tensor) -> torch.Tensor:
    """Iqk of every query node, sum_s (A'_ts - A_ts) G_ts: ``[batch, t, head]``."""
    return torch.einsum("bhts,bhts->bth", delta, grad_pattern)


def key_effect(fix: KeyFix, grad_pattern: torch.Tensor, group: int) -> torch.Tensor:
    """Iqk of every key node, summed over query rows and the heads its kv-head feeds:
    ``[batch, s, kv_head]`` (``fix`` from ``key_fix``; GradDrop's variants use ``kept_key_effect``)."""
    centred = grad_pattern - (fix.pattern * grad_pattern).sum(-1, keepdim=True)  # [batch, head, t, s]
    at_top = fix.coeff_top * (grad_pattern.gather(-1, fix.top) - (fix.rest * grad_pattern).sum(-1, keepdim=True))
    per_row = (fix.coeff * centred).scatter(-1, fix.top, at_top)  # [batch, head, t, s]
    return _per_kv_head(per_row.sum(2), group)


def _per_kv_head(per_head: torch.Tensor, group: int) -> torch.Tensor:
    """``[batch, head, s]`` summed over the heads each kv-head feeds: ``[batch, s, kv_head]``."""
    return per_head.transpose(1, 2).unflatten(-1, (-1, group)).sum(-1)


@dataclass(frozen=True)
class KeptFix:
    """One layer's QK fix as GradDrop keeps it for its variants, ``[batch, head, t, d_head]``
    unless noted. dL/dA = dL/dz v^T (``AttentionGeometry``), so a query row's change needs delta
    only through delta v, and a key's top-entry term needs ``rest`` only through rest v: one
    ``[batch, head, t, s]`` tensor (the key coefficients) instead of three."""

    delta_v: torch.Tensor | None  # (A' - A) v per query row; None without query sites
    coeff: torch.Tensor | None    # [batch, head, t, s] KeyFix.coeff; None without key sites (then so are the rest)
    top: torch.Tensor | None      # [batch, head, t, 1]
    coeff_top: torch.Tensor | None  # [batch, head, t, 1]
    top_v: torch.Tensor | None    # v at each row's top entry minus rest v


def keep(delta: torch.Tensor | None, fix: KeyFix | None, v: torch.Tensor) -> KeptFix:
    """The factored form of a layer's fix for the values ``v`` ``[batch, pos, head, d_head]``
    (kv-heads already repeated to the query heads)."""
    v = v.transpose(1, 2)  # [batch, head, s, d_head]
    delta_v = delta @ v if delta is not None else None
    if fix is None:
        return KeptFix(delta_v, None, None, None, None)
    at_top = v.gather(2, fix.top.expand(-1, -1, -1, v.shape[-1]))  # [batch, head, t, d_head]
    return KeptFix(delta_v, fix.coeff, fix.top, fix.coeff_top, at_top - fix.rest @ v)


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
    mean_g = (gz * z.transpose(1, 2)).sum(-1, keepdim=True)  # [batch, head, t, 1]
    per_head = (grad_pattern - mean_g).mul_(kept.coeff).sum(2)  # [batch, head, s]; coeff is 0 at each row's top
    at_top = kept.coeff_top * (gz * kept.top_v).sum(-1, keepdim=True)  # [batch, head, t, 1]
    return _per_kv_head(per_head.scatter_add_(-1, kept.top.squeeze(-1), at_top.squeeze(-1)), group)

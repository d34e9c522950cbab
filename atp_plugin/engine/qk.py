"""The QK fix (AtP* part 1): attention-pattern changes from patching one query or one key,
computed exactly through the softmax and linearized only after it.

Shapes: q, k are ``[batch, pos, head, d_head]`` (k may have fewer kv-heads); scores, patterns and
their gradients are ``[batch, head, query_pos, key_pos]``, masked entries ``-inf`` in scores.
"""

from __future__ import annotations

import math

import torch

from ..hosts import AttentionGeometry


def _raw_scores(q: torch.Tensor, k: torch.Tensor, geom: AttentionGeometry) -> torch.Tensor:
    """softcap(q . k / scale) for every query/key pair: ``[batch, head, t, s]``."""
    k = k.repeat_interleave(geom.group, dim=2)  # [batch, pos, head, d_head]
    raw = torch.einsum("bthd,bshd->bhts", q, k) / geom.scale
    if geom.softcap is not None:
        raw = geom.softcap * torch.tanh(raw / geom.softcap)
    return raw


def query_delta(scores: torch.Tensor, q: torch.Tensor, q_noise: torch.Tensor, k: torch.Tensor,
                geom: AttentionGeometry) -> torch.Tensor:
    """A'_t - A_t for every query row t, with only q_t patched (keys clean): ``[batch, head, t, s]``.

    The new scores are the clean ones plus the change in softcap(q.k/scale), so masks and additive
    position biases carry over unchanged.
    """
    new = scores + (_raw_scores(q_noise, k, geom) - _raw_scores(q, k, geom))
    delta = torch.softmax(new, dim=-1) - torch.softmax(scores, dim=-1)
    return torch.nan_to_num(delta, nan=0.0)  # fully masked (padding) rows


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, accurate at both ends."""
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


def _log_one_minus_softmax(scores: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """log(1 - A) without cancellation: for each row's largest entry (the only one that can be
    near 1) the log of the sum of the other entries, elsewhere log1mexp."""
    out = _log1mexp(-logp)
    top = scores.argmax(dim=-1, keepdim=True)
    others = torch.logsumexp(scores.scatter(-1, top, float("-inf")), dim=-1, keepdim=True)
    return out.scatter(-1, top, others - torch.logsumexp(scores, dim=-1, keepdim=True))


def key_coefficients(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, k_noise: torch.Tensor,
                     geom: AttentionGeometry) -> torch.Tensor:
    """C_ts = p (e^d - 1) (1 - p) / Z for every query row t and key s, ``[batch, head, t, s]``, where
    p = A_ts, d = the change of logit s when only key s is patched, Z = 1 + p (e^d - 1).

    Row t then changes by sum_s' (A'_ts' - A_ts') G_ts' = [p (e^d - 1) / Z] (G_ts - sum_s' A_ts' G_ts')
    = C_ts (G_ts - Gbar_ts), Gbar_ts the mean of G over row t's other keys weighted by the pattern
    renormalized without s (``key_effect``). The factor (1 - p) is moved into C because
    p (e^d - 1) / Z alone overflows when p -> 1 and d << 0 while G_ts - sum_s' A_ts' G_ts' -> 0.
    In log space, log Z = logaddexp(log(1 - p), log p + d): no overflow for large d, no
    cancellation as p -> 1, tiny p never clamped; a row with one key cannot change (C = 0).
    """
    d = _raw_scores(q, k_noise, geom) - _raw_scores(q, k, geom)
    logp = torch.log_softmax(scores, dim=-1)
    log_1mp = _log_one_minus_softmax(scores, logp)
    log_z = torch.logaddexp(log_1mp, logp + d)
    log_abs_expm1 = torch.where(d > 0, d + _log1mexp(d), _log1mexp(-d))  # log|e^d - 1|
    coeff = torch.sign(d) * torch.exp(logp + log_abs_expm1 + log_1mp - log_z)
    return torch.where(torch.isfinite(scores), coeff, torch.zeros_like(coeff))


def query_effect(delta: torch.Tensor, grad_pattern: torch.Tensor) -> torch.Tensor:
    """Iqk of every query node, sum_s (A'_ts - A_ts) G_ts: ``[batch, t, head]``."""
    return torch.einsum("bhts,bhts->bth", delta, grad_pattern)


def key_effect(coeff: torch.Tensor, scores: torch.Tensor, pattern: torch.Tensor, grad_pattern: torch.Tensor,
               group: int) -> torch.Tensor:
    """Iqk of every key node, summed over query rows and the heads its kv-head feeds:
    sum_h sum_t C_ts (G_ts - Gbar_ts): ``[batch, s, kv_head]`` (``coeff`` from ``key_coefficients``).

    Gbar_ts = sum_{s' != s} A_ts' G_ts' / (1 - A_ts). Only a row's largest entry can have A_ts near 1;
    there the weights are the softmax of the scores without that entry (no 0/0 when the other
    entries underflow), elsewhere (sum_s' A_ts' G_ts' - A_ts G_ts) / (1 - A_ts) with 1 - A_ts >= 1/2.
    """
    weighted = (pattern * grad_pattern).sum(-1, keepdim=True)  # [batch, head, t, 1]
    others = (weighted - pattern * grad_pattern) / (1 - pattern)  # [batch, head, t, s]; top entry replaced below
    top = scores.argmax(dim=-1, keepdim=True)
    rest = torch.nan_to_num(torch.softmax(scores.scatter(-1, top, float("-inf")), dim=-1), nan=0.0)  # one-key rows
    others = others.scatter(-1, top, (rest * grad_pattern).sum(-1, keepdim=True))
    per_head = torch.einsum("bhts,bhts->bsh", coeff, grad_pattern - others)
    return per_head.unflatten(-1, (-1, group)).sum(-1)

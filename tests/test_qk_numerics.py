"""Numerics of the O(T^2) key-node QK fix (``atp_plugin.engine.qk``) against exact arithmetic.

For one softmax row with logits x, gradient G and key s's logit changed by d, the QK fix needs
sum_s' (A'_s' - A_s') G_s' (docs/method.md, "Keys: closed form"). ``key_fix`` + ``key_effect`` compute it in closed
form; here it is recomputed with mpmath at 400 digits straight from the definition (two softmaxes)
and compared entry by entry with a relative tolerance, in the regimes where float64 formulas break:
saturated rows (1 - p ~ 1e-21), logit changes of +-800 (e^800 overflows), probabilities down to
e^-745 (the smallest subnormal; must not be clamped to 0).
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from atp_plugin.engine import qk
from atp_plugin.hosts import AttentionGeometry

# A_s' - A_s for the top entry of a row whose other entries are ~e^-745 needs ~330 digits
mpmath.mp.dps = 400
INF = float("inf")


def geometry(group: int = 1, scale: float = 1.0) -> AttentionGeometry:
    return AttentionGeometry(q_hook="", k_hook="", scores_hook="", pattern_hook="", v_hook="", z_hook="",
                             scale=scale, softcap=None, group=group)


def exact_row_change(x: list[float], g: list[float], s: int, d: float) -> float:
    """sum_s' (A'_s' - A_s') G_s' with A = softmax(x), A' = softmax(x with x_s += d), in mpmath."""
    def softmax(logits: list) -> list:
        real = [v for v in logits if v != -mpmath.inf]
        top = max(real)
        e = [mpmath.e ** (v - top) if v != -mpmath.inf else mpmath.mpf(0) for v in logits]
        total = mpmath.fsum(e)
        return [v / total for v in e]

    old = [mpmath.mpf(v) if v != -INF else -mpmath.inf for v in x]
    new = list(old)
    if new[s] == -mpmath.inf:
        return 0.0  # a masked key is no node of this row
    new[s] = new[s] + mpmath.mpf(d)
    a, b = softmax(old), softmax(new)
    return float(mpmath.fsum((bi - ai) * mpmath.mpf(gi) for ai, bi, gi in zip(a, b, g)))


def engine_row_change(x: list[float], g: list[float], d: list[float]) -> torch.Tensor:
    """The same for every key s of one row at once, through key_fix + key_effect.

    One head, one query row; q = 1, k = 0, k_noise = d and scale 1 make the logit change of key s
    exactly d_s.
    """
    n = len(x)
    scores = torch.tensor(x, dtype=torch.float64).reshape(1, 1, 1, n)  # [batch, head, t, s]
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)  # [batch, t, head, d_head]
    k = torch.zeros(1, n, 1, 1, dtype=torch.float64)  # [batch, s, kv_head, d_head]
    k_noise = torch.tensor(d, dtype=torch.float64).reshape(1, n, 1, 1)
    pattern = torch.softmax(scores, dim=-1)
    grad = torch.tensor(g, dtype=torch.float64).reshape(1, 1, 1, n)
    return qk.key_effect(qk.key_fix(scores, pattern, q, k, k_noise, geometry()), grad, 1)[0, :, 0]  # [s]


def random_grad(n: int, seed: int) -> list[float]:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()


CASES = {
    # 1 - p_0 = 4 e^-50 ~ 8e-22: p_0 is exactly 1.0 in float64; d = -60 leaves Z ~ 1e-21
    "saturated": ([0.0, -50.0, -50.0, -50.0, -50.0], [-60.0, 3.0, -2.0, 50.0, 0.0]),
    "saturated_top_rises": ([0.0, -48.0, -55.0], [5.0, -1.0, 60.0]),
    # e^800 overflows float64
    "huge_changes": ([0.0, 1.0, -2.0, 0.5], [800.0, -800.0, 800.0, -800.0]),
    "huge_changes_saturated": ([0.0, -60.0, -60.0], [-800.0, 800.0, -800.0]),
    # p_1 ~ 2.6e-300, p_2 ~ 9.9e-305, p_3 = e^-745 (subnormal): the patched key can win the row
    "tiny_probabilities": ([0.0, -690.0, -700.0, -745.0], [10.0, 10.0, 700.0, 745.0]),
    "tiny_probability_small_change": ([0.0, -690.0, -1.0], [0.0, 1e-3, -1e-3]),
    # causal / padding mask: masked keys are no nodes, a one-key row cannot change
    "masked": ([0.0, -1.0, -INF, -INF], [2.0, -3.0, 5.0, 5.0]),
    "one_key": ([3.0, -INF, -INF], [7.0, 1.0, 1.0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_key_effect_matches_exact_arithmetic(case: str) -> None:
    x, d = CASES[case]
    g = random_grad(len(x), seed=len(case))
    got = engine_row_change(x, g, d)
    expected = torch.tensor([exact_row_change(x, g, s, d[s]) for s in range(len(x))], dtype=torch.float64)
    assert torch.isfinite(got).all(), f"{case}: {got}"
    # entry by entry, relative: tiny changes (1e-296) must be as accurate as O(1) ones
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)


def test_tiny_probabilities_are_not_clamped() -> None:
    x, d = CASES["tiny_probabilities"]
    got = engine_row_change(x, random_grad(len(x), 3), [1.0] * len(x))
    assert 1e-305 < abs(float(got[1])) < 1e-295  # p ~ 2.6e-300 times (e - 1) times O(1)
    assert got[3] != 0  # p = e^-745, the smallest subnormal, still gives a nonzero change


def test_key_effect_matches_direct_formula_full_geometry() -> None:
    """Moderate logits, where float64 softmaxes are accurate: causal mask, several query rows and
    grouped-query heads, compared with two softmaxes per (row, key) summed over rows and the
    heads a kv-head feeds (the O(T^3) definition)."""
    g = torch.Generator().manual_seed(0)
    b, heads, kv, t, dh = 2, 4, 2, 5, 3
    q = torch.randn(b, t, heads, dh, generator=g, dtype=torch.float64)
    k = torch.randn(b, t, kv, dh, generator=g, dtype=torch.float64)
    k_noise = torch.randn(b, t, kv, dh, generator=g, dtype=torch.float64)
    geom = geometry(group=heads // kv, scale=math.sqrt(dh))
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def scores_of(keys: torch.Tensor) -> torch.Tensor:  # [b, head, t, s]
        raw = torch.einsum("bthd,bshd->bhts", q, keys.repeat_interleave(geom.group, dim=2)) / geom.scale
        return raw.masked_fill(~causal, -INF)

    scores = scores_of(k)
    pattern = torch.softmax(scores, dim=-1)
    grad = torch.randn(b, heads, t, t, generator=g, dtype=torch.float64)
    got = qk.key_effect(qk.key_fix(scores, pattern, q, k, k_noise, geom), grad, geom.group)

    expected = torch.zeros(b, t, kv, dtype=torch.float64)
    for s in range(t):
        for j in range(kv):
            patched = k.clone()
            patched[:, s, j] = k_noise[:, s, j]
            change = (torch.softmax(scores_of(patched), dim=-1) - pattern) * grad  # [b, head, t, s']
            expected[:, s, j] = change.sum((1, 2, 3))
    assert got.shape == (b, t, kv)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def exact_query_change(x: list[float], c: list[float]) -> list[float]:
    """softmax(x + c) - softmax(x) entry by entry, in mpmath (masked entries -inf stay 0)."""
    def softmax(logits: list) -> list:
        top = max(v for v in logits if v != -mpmath.inf)
        e = [mpmath.e ** (v - top) if v != -mpmath.inf else mpmath.mpf(0) for v in logits]
        total = mpmath.fsum(e)
        return [v / total for v in e]

    old = [mpmath.mpf(v) if v != -INF else -mpmath.inf for v in x]
    new = [o + mpmath.mpf(ci) if o != -mpmath.inf else o for o, ci in zip(old, c)]
    return [float(b - a) for a, b in zip(softmax(old), softmax(new))]


QUERY_CASES = {
    # a saturated row whose logits halve (a query's norm halves): 1e-17 changes next to a 1
    "saturated_rescaled": ([0.0, -40.0, -40.0, -40.0], [0.0, 20.0, 20.0, 20.0]),
    "saturated_flips": ([0.0, -50.0, -50.0], [-60.0, 3.0, 55.0]),
    "huge_changes": ([0.0, 1.0, -2.0, 0.5], [800.0, -800.0, 800.0, -800.0]),
    "tiny_probabilities": ([0.0, -690.0, -700.0, -745.0], [0.0, 1.0, 700.0, 745.0]),
    "masked": ([0.0, -1.0, -INF, -INF], [2.0, -3.0, 5.0, 5.0]),
}


@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_query_delta_matches_exact_arithmetic(case: str) -> None:
    """The query-node fix recomputes a whole row: A' - A must be accurate relative to each entry,
    down to the 1e-17 changes of a saturated row (a difference of two float64 softmaxes got their
    sign wrong)."""
    x, c = QUERY_CASES[case]
    n = len(x)
    scores = torch.tensor(x, dtype=torch.float64).reshape(1, 1, 1, n)  # [batch, head, t, s]
    q, q_noise = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor(c, dtype=torch.float64).reshape(1, n, 1, 1)  # logit change of key s: (1 - 0) * c_s
    got = qk.query_delta(scores, q, q_noise, k, geometry())[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor(exact_query_change(x, c), dtype=torch.float64), rtol=1e-12, atol=0.0)

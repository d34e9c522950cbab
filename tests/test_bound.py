"""The false-negative bound on a planted additive setting: two large attn_v effects (head 1 at the
two corrupted positions), everything else at least 4x smaller. Effects add exactly there, so the
subset means, the Welch tests and theta can be recomputed here from the ap effects alone. Over
several sites (attn_v and resid_pre, three layers, left-padded pairs), every unverified node's row
against joint patches written with TransformerLens hooks. The planted setting needs a model without
LayerNorm (a HookedTransformer, TransformerLens 3); the other tests also run on a TransformerBridge."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from atp_plugin import attribute, false_negative_bound, metrics
from atp_plugin.backends.baselines import random_subsets
from conftest import (
    host_model,
    logit_diff_metric,
    make_additive_model,
    make_pairs,
    make_planted_pairs,
    needs_additive,
)
from helpers import (
    PADDED_CLEAN,
    PADDED_CORRUPT,
    PADDED_TYPES,
    joint_patch_effects,
    node_label,
    padded_metric,
    padded_nodes,
    real_pair_means,
    words_model,
)

N, T = 3, 6
S, P = 150, 0.3


@pytest.fixture(scope="module")
def planted():
    model = make_additive_model(planted_head=1)
    clean, corrupt = make_planted_pairs(N, T)
    metric = logit_diff_metric(N)
    truth = attribute(model, clean, corrupt, metric, nodes=["attn_v"], method="ap")
    sizes = np.sort(truth.to_frame()["score"].to_numpy())[::-1]
    assert sizes[1] > 4 * sizes[2]  # the setting: two planted effects, the rest small
    return model, clean, corrupt, metric, truth


@needs_additive
def test_bound_exceeds_an_unverified_planted_effect(planted):
    model, clean, corrupt, metric, truth = planted
    frame = truth.to_frame()
    bound = false_negative_bound(model, clean, corrupt, metric, truth, k=1, n_subsets=S, p=P)
    missed = frame["score"].nlargest(2).iloc[1]  # the second planted node, left unverified
    assert bound.theta >= missed
    assert bound.estimates["node"].iloc[0] == frame.loc[frame["score"].nlargest(2).index[1], "node"]
    assert len(bound.verified) == 1 and len(bound.estimates) == len(frame) - 1
    np.testing.assert_allclose(bound.verified["effect"], frame["signed"].loc[frame["score"].idxmax()], atol=1e-12)


@needs_additive
def test_bound_below_every_verified_planted_effect(planted):
    model, clean, corrupt, metric, truth = planted
    bound = false_negative_bound(model, clean, corrupt, metric, truth, k=2, n_subsets=S, p=P)
    sizes = np.sort(truth.to_frame()["score"].to_numpy())[::-1]
    assert sizes[2] <= bound.theta < sizes[1]
    assert str(bound).startswith("with 95% confidence no node outside the verified top 2 has |effect| above")


@needs_additive
def test_bound_against_a_reference(planted):
    """Estimates, Welch statistics, theta and p-values recomputed from the ap effects and the
    documented subsets with scipy; cost counted."""
    model, clean, corrupt, metric, truth = planted
    bound = false_negative_bound(model, clean, corrupt, metric, truth, k=2, n_subsets=S, p=P, confidence=0.9, seed=4)
    frame = truth.to_frame()
    rest = frame.drop(index=frame["score"].nlargest(2).index).reset_index(drop=True)
    effects = rest["signed"].to_numpy()  # [U]: the unverified nodes, in frame order (one site)
    member = random_subsets(4, P, len(effects))(0, S).numpy()  # [S, U]
    means = member @ effects  # [S]: the mean effect of each joint patch, by additivity
    d, se, df = [], [], []
    for n in range(len(effects)):
        a, b = means[member[:, n]], means[~member[:, n]]
        welch = stats.ttest_ind(a, b, equal_var=False)
        d.append(a.mean() - b.mean())
        se.append(d[-1] / welch.statistic)
        df.append(welch.df)
    d, se, df = map(np.array, (d, se, df))
    upper = np.abs(d) + stats.t.ppf(0.9, df) * se
    got = bound.estimates.set_index("node").loc[rest["node"]]
    np.testing.assert_allclose(got["estimate"], d, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["std_error"], se, rtol=1e-7)
    np.testing.assert_allclose(got["df"], df, rtol=1e-7)
    np.testing.assert_allclose(got["upper"], upper, rtol=1e-7)
    assert bound.theta == pytest.approx(upper.max(), rel=1e-7)

    def p_value(theta: float) -> float:  # TOST: max over nodes of max(P(T <= (d-theta)/se), P(T >= (d+theta)/se))
        return max(max(stats.t.cdf((d - theta) / se, df)[n], stats.t.sf((d + theta) / se, df)[n])
                   for n in range(len(d)))

    for theta in (0.5 * bound.theta, bound.theta, 1.5 * bound.theta):
        assert bound.p_value(theta) == pytest.approx(p_value(theta), rel=1e-9)
    assert bound.p_value(bound.theta) == pytest.approx(0.1, rel=1e-6)  # theta is where max p = 1 - confidence
    assert bound.p_value(0.99 * bound.theta) > 0.1 > bound.p_value(1.01 * bound.theta)
    # verification: 2 nodes x N pairs + noise + clean; the subsets: S x N + noise + clean (the node
    # shapes are known from the ap run: Engine.with_metric keeps them, no probe run)
    assert bound.forward_passes == (2 * N + 2 * N) + (S * N + 2 * N)


def test_bound_over_several_sites_against_joint_patches(host):
    """attn_v and resid_pre nodes on three layers, pairs of lengths 3, 5, 4: each unverified node's
    estimate (mean effect over the subsets that contain it minus over those that do not, effects
    averaged over the pairs where the node exists), Welch standard error and df, and upper bound,
    from per-subset joint patches run here; rows matched by node label."""
    model = words_model(host)
    metric = padded_metric()
    result = attribute(model, PADDED_CLEAN, PADDED_CORRUPT, metric, nodes=PADDED_TYPES, method="atp")
    k, n_subsets, seed = 3, 60, 6
    bound = false_negative_bound(model, PADDED_CLEAN, PADDED_CORRUPT, metric, result, k=k, n_subsets=n_subsets,
                                 p=P, confidence=0.9, seed=seed)
    top = list(result.top(k)["node"])
    assert list(bound.verified["node"]) == top
    # the subsets' columns: the unverified nodes in site order (node type, layer), then position, head
    nodes = [n for n in padded_nodes(model) if node_label(n) not in top]
    labels = [node_label(n) for n in nodes]
    assert {n[0] for n in nodes} == set(PADDED_TYPES) and len({n[:2] for n in nodes}) == 6  # six sites
    member = random_subsets(seed, P, len(nodes))(0, n_subsets).numpy()  # [S, U]: membership only
    effects = joint_patch_effects(model, [[nodes[u] for u in np.flatnonzero(row)] for row in member])  # [S, N]
    z = real_pair_means(model, effects, [pos for _, _, pos, _ in nodes])  # [S, U]
    rows = []
    for u in range(len(nodes)):
        a, b = z[member[:, u], u], z[~member[:, u], u]
        d = a.mean() - b.mean()
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        df = stats.ttest_ind(a, b, equal_var=False).df
        rows.append((d, se, df, abs(d) + stats.t.ppf(0.9, df) * se, len(a), len(b)))
    d, se, df, upper, n_in, n_out = map(np.array, zip(*rows))
    assert sorted(bound.estimates["node"]) == sorted(labels)
    got = bound.estimates.set_index("node").loc[labels]
    np.testing.assert_allclose(got["estimate"], d, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["std_error"], se, rtol=1e-7)
    np.testing.assert_allclose(got["df"], df, rtol=1e-7)
    np.testing.assert_allclose(got["upper"], upper, rtol=1e-7)
    np.testing.assert_array_equal(got["n_in"], n_in)
    np.testing.assert_array_equal(got["n_out"], n_out)
    assert bound.theta == pytest.approx(upper.max(), rel=1e-7)


@needs_additive
def test_bad_input(planted):
    model, clean, corrupt, metric, truth = planted
    with pytest.raises(ValueError, match="different model"):
        false_negative_bound(make_additive_model(), clean, corrupt, metric, truth, k=1, n_subsets=S, p=P)
    other_clean, other_corrupt = make_pairs(N, T)
    with pytest.raises(ValueError, match="differ from the prompts"):
        false_negative_bound(model, other_clean, other_corrupt, metric, truth, k=1, n_subsets=S, p=P)
    with pytest.raises(ValueError, match="raise n_subsets"):
        false_negative_bound(model, clean, corrupt, metric, truth, k=1, n_subsets=5, p=P)
    with pytest.raises(ValueError, match="leaves no unverified node"):
        false_negative_bound(model, clean, corrupt, metric, truth, k=len(truth.to_frame()), n_subsets=S, p=P)
    with pytest.raises(ValueError, match="confidence"):
        false_negative_bound(model, clean, corrupt, metric, truth, k=1, n_subsets=S, p=P, confidence=1.0)
    with pytest.raises(ValueError, match="summed-over-positions"):
        false_negative_bound(model, clean, corrupt, metric, truth.sum_over_positions(), k=1, n_subsets=S, p=P)
    with pytest.raises(ValueError, match=f"answers for {N + 1} pairs but {N} pairs"):
        false_negative_bound(model, clean, corrupt, logit_diff_metric(N + 1), truth, k=1, n_subsets=S, p=P)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        false_negative_bound(model, clean, corrupt, metrics.logit_diff([10_000] * N, [0] * N), truth, k=1,
                             n_subsets=S, p=P)


def test_nonadditive_model_runs(host):
    """On a 2-layer model with LayerNorm the subsets interact; the bound still covers the nodes
    left unverified there (checked against ap at this seed), and every node gets a finite upper bound."""
    model = host_model(host, 0, n_layers=2)
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    truth = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="ap")
    bound = false_negative_bound(model, clean, corrupt, metric, truth, k=3, n_subsets=100, p=0.1)
    assert np.isfinite(bound.estimates["upper"]).all()
    assert bound.theta >= truth.to_frame()["score"].nlargest(4).iloc[3]


@needs_additive
def test_too_few_subsets_give_no_bound_and_say_why(planted):
    """With 20 subsets at p=0.1 (the least the input check allows) some nodes land in fewer than 2 of
    them by chance: no standard error for those, so no theta."""
    model, clean, corrupt, metric, truth = planted
    bound = false_negative_bound(model, clean, corrupt, metric, truth, k=1, n_subsets=20, p=0.1)
    short = ((bound.estimates["n_in"] < 2) | (bound.estimates["n_out"] < 2)).sum()
    assert short > 0 and bound.theta == float("inf")
    assert str(bound).startswith(f"no bound: {short} of the unverified nodes were in, or out of, fewer than 2")
    assert "raise n_subsets" in str(bound)

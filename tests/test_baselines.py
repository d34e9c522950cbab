"""Baseline backends: iterative = ap, subsampling against its closed form and its standard error,
hierarchical/blocks reach the planted nodes with exact numbers; costs as Engine counts them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from atp_plugin import attribute, plugins
from atp_plugin.backends.baselines import GroupPatching, Subsampling, random_subsets, real_nodes, subsample
from conftest import logit_diff_metric, make_additive_model, make_model, make_pairs, make_planted_pairs

N, T = 3, 6


@pytest.fixture(scope="module")
def additive():
    """Planted additive setting: head 1's values at the two corrupted positions dominate."""
    model = make_additive_model(planted_head=1)
    clean, corrupt = make_planted_pairs(N, T)
    metric = logit_diff_metric(N)
    truth = attribute(model, clean, corrupt, metric, nodes=["attn_v"], method="ap")
    return model, clean, corrupt, metric, truth


def test_registered():
    names = plugins.backends()
    assert {"iterative", "subsampling", "hierarchical", "blocks"} <= set(names)
    assert plugins.registries()["backends"].owners["subsampling"] == "atp_plugin.backends.baselines"


def test_iterative_equals_ap():
    model = make_model(0, n_layers=2)
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    runs = {m: attribute(model, clean, corrupt, metric, nodes=["attn_z", "resid_pre"], method=m)
            for m in ("ap", "iterative")}
    for key in runs["ap"].scores:
        torch.testing.assert_close(runs["iterative"].signed[key], runs["ap"].signed[key], rtol=0, atol=0)
        torch.testing.assert_close(runs["iterative"].scores[key], runs["ap"].scores[key], rtol=0, atol=0)
    n_nodes = 2 * T * 4 + 2 * T
    # one patched copy per (pair, node), plus the noise and clean runs and one shape probe
    assert runs["iterative"].engine.forward_passes == n_nodes * N + 2 * N + 1


def test_subsampling_is_the_difference_of_means(additive):
    """Effects add exactly here, so the mean effect of subset j is sum_m B_jm I(m): the estimate
    of node n must equal sum_m I(m) (mean of B_m over subsets with n - over subsets without n)."""
    model, clean, corrupt, metric, truth = additive
    backend = Subsampling(n_subsets=120, p=0.3, seed=7)
    result = attribute(model, clean, corrupt, metric, nodes=["attn_v"], method=backend)
    effects = truth.signed["attn_v"].reshape(-1).numpy()  # [U]: one layer, pos-major, no padding
    member = random_subsets(7, 0.3, len(effects))(0, 120).numpy()  # [S, U]
    coupling = np.stack([member[member[:, n]].mean(0) - member[~member[:, n]].mean(0)
                         for n in range(len(effects))])  # [U, U]
    np.testing.assert_allclose(result.signed["attn_v"].reshape(-1).numpy(), coupling @ effects, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.scores["attn_v"].numpy(), np.abs(result.signed["attn_v"].numpy()))
    assert result.engine.forward_passes == 120 * N + 2 * N + 1


def test_subsampling_converges_to_ap_within_its_standard_error(additive):
    """Unbiased under additivity: every estimate within 4 standard errors of ap, the standard
    errors and Welch df those of scipy's Welch t-test on the subset means, and the spread of the
    standardized errors about 1."""
    model, clean, corrupt, metric, truth = additive
    engine = truth.engine
    effects = truth.signed["attn_v"].reshape(-1).numpy()
    est = subsample(engine, real_nodes(engine), n_subsets=400, p=0.5, seed=3)
    d, se = est.estimate.numpy(), est.std_error.numpy()
    z = (d - effects) / se
    assert np.abs(z).max() < 4, z
    assert 0.3 < np.mean(z ** 2) < 2.0
    member = random_subsets(3, 0.5, len(effects))(0, 400).numpy()
    subset_means = member @ effects  # [S]: additivity
    for n in range(len(effects)):
        welch = stats.ttest_ind(subset_means[member[:, n]], subset_means[~member[:, n]], equal_var=False)
        assert d[n] / se[n] == pytest.approx(welch.statistic, rel=1e-7, abs=1e-9)
        assert est.df[n].item() == pytest.approx(welch.df, rel=1e-7)
    # the error shrinks like 1/sqrt(n_subsets): ~ sqrt(sum of the other squared effects / S)
    expected = np.sqrt((np.sum(effects ** 2) - effects ** 2) / 400)
    np.testing.assert_allclose(se, expected, rtol=0.1)


@pytest.mark.parametrize("backend", [GroupPatching(branching=2), GroupPatching(branching=3, block_size=6),
                                     GroupPatching("blocks", "", branching=8, block_size=8)])
def test_group_patching_finds_planted_nodes(additive, backend):
    model, clean, corrupt, metric, truth = additive
    result = attribute(model, clean, corrupt, metric, nodes=["attn_v"], method=backend)
    true, got = truth.signed["attn_v"].reshape(-1), result.signed["attn_v"].reshape(-1)
    planted = torch.topk(truth.scores["attn_v"].reshape(-1), 2).indices
    rest = torch.ones_like(true, dtype=torch.bool)
    rest[planted] = False
    assert truth.scores["attn_v"].reshape(-1)[planted].min() > 4 * truth.scores["attn_v"].reshape(-1)[rest].max()
    torch.testing.assert_close(got[planted], true[planted], rtol=0, atol=1e-12)  # leaves: exact effects
    reached = got != 0
    torch.testing.assert_close(got[reached], true[reached], rtol=0, atol=1e-12)
    assert reached.sum() < len(true)  # some groups were pruned, and their nodes score 0
    torch.testing.assert_close(result.scores["attn_v"], result.signed["attn_v"].abs())
    assert result.engine.forward_passes < truth.engine.forward_passes


def test_group_patching_cost_is_counted(additive):
    """branching=2 over 24 nodes: 2 groups of 12 at the first level, then halves of every group
    with |effect| >= threshold; each level costs N patched copies per group plus 2N runs."""
    model, clean, corrupt, metric, truth = additive
    threshold = 0.02
    result = attribute(model, clean, corrupt, metric, nodes=["attn_v"],
                       method=GroupPatching(branching=2, threshold=threshold))
    effects = truth.signed["attn_v"].reshape(-1).numpy()  # additive: a group's effect is its sum
    groups, passes, reached = [(0, 12), (12, 24)], 1, []  # 1: the shape probe
    while groups:
        passes += N * len(groups) + 2 * N
        deeper = []
        for a, b in groups:
            e = effects[a:b].sum()
            if b - a == 1:
                reached.append(a)
            elif abs(e) >= threshold:
                mid = a + math.ceil((b - a) / 2)
                deeper += [(a, mid), (mid, b)]
        groups = deeper
    assert result.engine.forward_passes == passes
    got = result.signed["attn_v"].reshape(-1).numpy()
    np.testing.assert_allclose(got[reached], effects[reached], rtol=0, atol=1e-12)
    assert not np.delete(got, reached).any()  # pruned: 0


def test_bad_options():
    model = make_model(0, n_layers=1)
    clean, corrupt = make_pairs(2, 4)
    metric = logit_diff_metric(2)
    with pytest.raises(ValueError, match="p .* must be in"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method=Subsampling(p=1.5))
    with pytest.raises(ValueError, match="raise n_subsets"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method=Subsampling(n_subsets=10, p=0.1))
    with pytest.raises(ValueError, match="branching"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method=GroupPatching(branching=1))
    with pytest.raises(TypeError, match="method must be"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method=3)

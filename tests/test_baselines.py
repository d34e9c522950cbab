"""Baseline backends: iterative = ap, subsampling against its closed form and its standard error,
hierarchical/blocks reach the planted nodes with exact numbers; costs as Engine counts them. On
left-padded pairs of different lengths, subsampling and hierarchical/blocks against naive
references: joint patches written here with TransformerLens hooks, one unpadded prompt at a time.
The planted additive setting needs a model without LayerNorm (a HookedTransformer, TransformerLens 3);
the other tests also run on a TransformerBridge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from atp_plugin import attribute, plugins
from atp_plugin.backends.baselines import GroupPatching, Subsampling, random_subsets, real_nodes, subsample
from conftest import (
    HOSTS,
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
    WIDTH,
    Node,
    joint_patch_effects,
    padded_lengths,
    padded_metric,
    padded_nodes,
    real_pair_means,
    words_model,
)

N, T = 3, 6


def reported(result, nodes: list[Node], kind: str = "signed") -> np.ndarray:
    """The result's ``kind`` values of ``nodes``, read from its [layer, pos(, head)] tensors."""
    table = getattr(result, kind)
    return np.array([float(table[t][(layer, pos) + (() if head is None else (head,))])
                     for t, layer, pos, head in nodes])


@pytest.fixture(scope="module", params=HOSTS)
def padded_model(request):
    """A 3-layer LayerNorm/GELU float64 model with the word-level tokenizer."""
    return words_model(request.param)


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


def test_iterative_equals_ap(host):
    model = host_model(host, 0, n_layers=2)
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


@needs_additive
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


@needs_additive
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


@needs_additive
@pytest.mark.parametrize("backend", [GroupPatching(branching=2), GroupPatching(branching=3, block_size=6),
                                     GroupPatching("blocks", branching=8, block_size=8)])
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


@needs_additive
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


def test_bad_options(host):
    model = host_model(host, 0, n_layers=1)
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


def test_subsampling_on_left_padded_pairs(padded_model):
    """Subsampling on pairs of lengths 3, 5, 4: per subset, the joint patch of its nodes in each
    pair (only where a node's position is real), averaged per node over the pairs where the node
    exists; the estimate is the mean over subsets with the node minus over those without."""
    model, S, p, seed = padded_model, 40, 0.3, 5
    nodes = padded_nodes(model)
    result = attribute(model, PADDED_CLEAN, PADDED_CORRUPT, padded_metric(), nodes=PADDED_TYPES,
                       method=Subsampling(n_subsets=S, p=p, seed=seed))
    # prompt lengths 3, 5, 4
    assert result.alignment.startswith("left-padded") and result.pair_counts.tolist() == [1, 2, 3, 3, 3]
    member = random_subsets(seed, p, len(nodes))(0, S).numpy()  # [S, U]: only which node is in which subset
    effects = joint_patch_effects(model, [[nodes[u] for u in np.flatnonzero(row)] for row in member])  # [S, N]
    z = real_pair_means(model, effects, [pos for _, _, pos, _ in nodes])  # [S, U]
    expected = np.array([z[member[:, u], u].mean() - z[~member[:, u], u].mean() for u in range(len(nodes))])
    np.testing.assert_allclose(reported(result, nodes), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reported(result, nodes, "scores"), np.abs(expected), rtol=1e-9, atol=1e-12)
    # the setting tells the pairs apart: averaging over every pair would give other estimates
    z_all = np.repeat(effects.mean(1, keepdims=True), len(nodes), 1)
    other = np.array([z_all[member[:, u], u].mean() - z_all[~member[:, u], u].mean() for u in range(len(nodes))])
    assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("method, branching, block_size", [("hierarchical", 4, None), ("blocks", 16, 16)])
def test_group_patching_on_left_padded_pairs(padded_model, method, branching, block_size):
    """The registered hierarchical and blocks backends on pairs of lengths 3, 5, 4, against the
    recursion replayed here: contiguous groups (node order of ``padded_nodes``) patched jointly,
    a group's effect the mean over the pairs where one of its nodes is real, groups with |effect| >=
    5% of the largest first-level |effect| split into ``branching`` parts; a node reached alone
    scores its exact effect over the pairs where it exists, every other node 0."""
    model = padded_model
    nodes = padded_nodes(model)
    sizes = padded_lengths(model)
    result = attribute(model, PADDED_CLEAN, PADDED_CORRUPT, padded_metric(), nodes=PADDED_TYPES, method=method)
    size = block_size or math.ceil(len(nodes) / branching)
    groups = [(a, min(a + size, len(nodes))) for a in range(0, len(nodes), size)]
    expected, threshold, reached = np.zeros(len(nodes)), None, []
    while groups:
        effects = joint_patch_effects(model, [nodes[a:b] for a, b in groups])  # [G, N]
        means = [effects[g, [i for i, n in enumerate(sizes) if any(pos >= WIDTH - n for _, _, pos, _ in nodes[a:b])]]
                 .mean() for g, (a, b) in enumerate(groups)]
        threshold = 0.05 * max(abs(e) for e in means) if threshold is None else threshold
        deeper = []
        for (a, b), e in zip(groups, means):
            if b - a == 1:
                expected[a] = e
                reached.append(a)
            elif abs(e) >= threshold:
                deeper += [(int(part[0]), int(part[-1]) + 1)
                           for part in np.array_split(np.arange(a, b), min(branching, b - a))]
        groups = deeper
    np.testing.assert_allclose(reported(result, nodes), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reported(result, nodes, "scores"), np.abs(expected), rtol=1e-9, atol=1e-12)
    # leaves: the exact effect of the node alone, over the pairs where it exists (not over every pair)
    partial = [u for u in reached if nodes[u][2] < WIDTH - min(sizes)]  # padding in some pair
    alone = joint_patch_effects(model, [[nodes[u]] for u in partial])  # [leaves, N]
    real = np.array([[nodes[u][2] >= WIDTH - n for n in sizes] for u in partial])  # [leaves, N]
    np.testing.assert_allclose((alone * real).sum(1) / real.sum(1), expected[partial], rtol=0, atol=1e-12)
    assert np.abs(alone.mean(1) - expected[partial]).max() > 1e-2

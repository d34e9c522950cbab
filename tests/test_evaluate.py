"""Cost-of-verification curves: the oracle is the diagonal, ap is the diagonal plus its own cost,
every curve is a method's cost plus N forward passes per node down to the last true top-x node in
its order (recomputed here from the results), costs as counted by the engine, curves monotone; on a
HookedTransformer (TransformerLens 3) and a TransformerBridge (both)."""

from __future__ import annotations

import dataclasses
import re
from importlib.resources import files

import numpy as np
import pytest

from atp_plugin import attribute, cli, evaluate
from atp_plugin.backends.baselines import Subsampling
from atp_plugin.evaluate import BACKWARD_COST, rank_order
from conftest import HOSTS, host_model, logit_diff_metric, make_pairs, usage_error

N, T, LAYERS, HEADS = 3, 6, 2, 4
TOP = 6


@pytest.fixture(scope="module", params=HOSTS)
def setting(request):
    model = host_model(request.param, 0, n_layers=LAYERS)
    clean, corrupt = make_pairs(N, T)
    return model, clean, corrupt, logit_diff_metric(N)


@pytest.fixture(scope="module")
def evaluation(setting):
    model, clean, corrupt, metric = setting
    with pytest.warns(UserWarning, match="GradDrop degenerates"):
        return evaluate(model, clean, corrupt, metric, nodes=["attn_z"], top_x=TOP, seed=1,
                        methods=["ap", "atp", "atp*", Subsampling(n_subsets=40, p=0.25), "hierarchical"])


def test_oracle_and_ap(evaluation):
    x = np.arange(1, TOP + 1)
    n_nodes = LAYERS * T * HEADS
    np.testing.assert_array_equal(evaluation.curves["oracle"], N * x)
    ap_cost = n_nodes * N + 2 * N + 1  # one patched copy per (node, pair), noise + clean runs, a shape probe
    assert evaluation.method_cost["ap"] == ap_cost
    np.testing.assert_array_equal(evaluation.curves["ap"], ap_cost + N * x)
    np.testing.assert_array_equal(evaluation.ranks["ap"], x)
    assert evaluation.n_nodes == n_nodes and evaluation.n_pairs == N


def test_costs_per_method(evaluation):
    """First-order methods: noise + clean forward per pair and one backward (GradDrop: L-1 cuts
    through l of L layers, (L-1)/2 more backward passes), a backward counting BACKWARD_COST."""
    assert BACKWARD_COST == 2
    assert evaluation.method_cost["atp"] == 2 * N + BACKWARD_COST * N
    assert evaluation.method_cost["atp*"] == 2 * N + BACKWARD_COST * N * (1 + (LAYERS - 1) / 2)
    assert evaluation.method_cost["subsampling"] == 40 * N + 2 * N + 1


def test_curves_from_the_rankings(setting, evaluation):
    model, clean, corrupt, metric = setting
    truth = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="ap").to_frame()
    atp = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp").to_frame()
    # ties (atp scores nodes with no path to the last position exactly 0) broken by the documented
    # permutation drawn from the seed
    tiebreak = np.random.default_rng(1).permutation(len(truth))
    true_top = sorted(range(len(truth)), key=lambda n: (-truth["score"].iloc[n], tiebreak[n]))[:TOP]
    assert len(set(truth["score"].to_numpy()[true_top])) == TOP
    by_atp = sorted(range(len(atp)), key=lambda n: (-atp["score"].iloc[n], tiebreak[n]))
    rank = {node: r + 1 for r, node in enumerate(by_atp)}
    expected = [evaluation.method_cost["atp"] + N * max(rank[n] for n in true_top[:x]) for x in range(1, TOP + 1)]
    np.testing.assert_array_equal(evaluation.curves["atp"], expected)
    assert list(evaluation.ranks.index) == list(truth["node"].to_numpy()[true_top])
    for method in evaluation.curves:
        assert (np.diff(evaluation.curves[method].to_numpy()) >= 0).all(), method
        assert (evaluation.curves[method] >= evaluation.curves["oracle"]).all(), method
    table = evaluation.table()
    assert table.loc[0, "atp"] == evaluation.method_cost["atp"] and table.loc[0, "oracle"] == 0


def test_rank_order_ties_and_nan():
    scores = np.array([1.0, np.nan, 3.0, 1.0, 3.0])
    np.testing.assert_array_equal(rank_order(scores, np.array([4, 0, 3, 1, 2])), [4, 2, 3, 0, 1])


def test_plot(evaluation, tmp_path):
    path = evaluation.plot(tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("top", [5, TOP])
def test_the_count_axis_has_whole_number_ticks(evaluation, top):
    """x counts nodes: matplotlib's default ticks over 1..5 are 1, 1.5, 2, ... (over 1..20: 2.5, 7.5, ...)."""
    ax = dataclasses.replace(evaluation, curves=evaluation.curves.head(top)).figure().axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks


def test_one_method_given_bare_is_one_method(setting, evaluation):
    """methods="atp" is the method atp (not the letters a, t, p); one backend instance is one method."""
    model, clean, corrupt, metric = setting
    one = evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods="atp", top_x=TOP, seed=1)
    assert list(one.curves.columns) == ["atp", "oracle"]
    np.testing.assert_array_equal(one.curves["atp"], evaluation.curves["atp"])
    backend = evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods=Subsampling(n_subsets=40, p=0.25),
                       top_x=TOP, seed=1)
    assert list(backend.curves.columns) == ["subsampling", "oracle"]


def test_bad_input(setting):
    model, clean, corrupt, metric = setting
    with pytest.raises(ValueError, match="methods is empty"):
        evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods=[])
    with pytest.raises(ValueError, match="distinct names"):
        evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods=["atp", "atp"])
    with pytest.raises(ValueError, match="top_x"):
        evaluate(model, clean, corrupt, metric, nodes=["resid_pre"], methods=["atp"], top_x=1000)



@pytest.mark.parametrize("argv, message", [
    (["--methods", "atp,nope"], r"unknown method\(s\) \['nope'\] in --methods"),
    (["--nodes", "attn_z,heads"], r"unknown node type\(s\) \['heads'\] in --nodes"),
    (["--top-x", "0"], r"--top-x must be at least 1, got 0"),
    (["--plot", "no/such/dir/c.png"], r"--plot no/such/dir/c\.png: the directory .* does not exist"),
    (["--csv", "no/such/dir/c.csv"], r"--csv no/such/dir/c\.csv: the directory .* does not exist"),
    (["--csv", "."], r"--csv \.: is a directory; give a file name"),
    (["--pairs", "200000"], r"--pairs 200000: the test split holds 121,420 distinct pairs"),
    (["--nodes", "attn_z", "--methods", "atp,ap", "--top-x", "100000"], r"top_x=100000 exceeds the 240 nodes"),
])
def test_cli_bad_arguments_are_exit_2_with_a_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    err = usage_error(capsys, ["evaluate", "--pairs", "1", *argv])
    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(not files("atp_plugin").joinpath("data", "model.safetensors").is_file(),
                    reason="the demo model weights are not bundled in this checkout yet")
def test_cli_on_the_demo_model(tmp_path, capsys):
    plot, csv = tmp_path / "curves.png", tmp_path / "curves.csv"
    code = cli.main(["evaluate", "--pairs", "2", "--nodes", "attn_z", "--methods", "atp,atp+qk", "--top-x", "3",
                     "--plot", str(plot), "--csv", str(csv)])
    out = capsys.readouterr().out
    assert code == 0 and plot.is_file() and csv.is_file()
    assert "atp+qk" in out and "oracle" in out

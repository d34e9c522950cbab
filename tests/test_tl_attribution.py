"""The one-import swap for TransformerLens 4.3's attribution_patch: the same Node keys and, with
method="atp", its numbers (on a GPT-2 Bridge in float64); with GradDrop, magnitudes."""

from __future__ import annotations

import pytest

from helpers import bridge_pairs
from hf_models import load_bridge, save_gpt2

original = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching",
                               reason="TransformerLens < 4.3 has no attribution_patch")
from atp_plugin.tl_attribution import attribution_patch  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    bridge = load_bridge(save_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=2))
    clean, corrupt, metric = bridge_pairs(n=3, t=6)
    answer, wrong = 5, 9

    def metric_fn(logits):
        return logits[0, -1, answer] - logits[0, -1, wrong]
    return bridge, clean, corrupt, metric_fn


def test_atp_equals_transformer_lens_node_scores(setup):
    bridge, clean, corrupt, metric_fn = setup
    theirs = original.attribution_patch(bridge, clean, corrupt, metric_fn)
    ours = attribution_patch(bridge, clean, corrupt, metric_fn, method="atp")
    assert set(ours.node_scores) == set(theirs.node_scores)
    for node, value in theirs.node_scores.items():
        assert ours.node_scores[node] == pytest.approx(value, rel=1e-8, abs=1e-11), node


def test_graddrop_scores_are_magnitudes_and_edges_point_to_the_edge_module(setup):
    bridge, clean, corrupt, metric_fn = setup
    star = attribution_patch(bridge, clean, corrupt, metric_fn)
    assert min(star.node_scores.values()) >= 0 and max(star.node_scores.values()) > 0
    try:
        edge = original.EdgeAttributionConfig(granularity="edge")
    except NotImplementedError:  # TransformerLens 3.9 refuses edge configs itself
        return
    with pytest.raises(ValueError, match=r"atp_plugin.edges.attribute_edges"):
        attribution_patch(bridge, clean, corrupt, metric_fn, edge)

"""The one-import swap for TransformerLens 4.3's attribution_patch and faithfulness: the same Node
keys and, with method="atp", its numbers, at node and edge granularity (on a GPT-2 Bridge in
float64); with GradDrop, magnitudes; faithfulness's result, per edge class, under both ablations."""

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


def test_graddrop_scores_are_magnitudes(setup):
    bridge, clean, corrupt, metric_fn = setup
    star = attribution_patch(bridge, clean, corrupt, metric_fn)
    assert min(star.node_scores.values()) >= 0 and max(star.node_scores.values()) > 0


def edge_config():
    try:
        return original.EdgeAttributionConfig(granularity="edge")
    except NotImplementedError as e:  # TransformerLens 3.9 ships the module with node granularity only
        pytest.skip(f"this TransformerLens has no edge attribution patching ({e})")


def test_edge_granularity_equals_transformer_lens(setup):
    """Edge scores (every writer -> reader at every position) and their per-writer sums, as
    TransformerLens's own EAP gives them, from attribute_edges; atp+qk and ig run through it too."""
    bridge, clean, corrupt, metric_fn = setup
    theirs = original.attribution_patch(bridge, clean, corrupt, metric_fn, edge_config())
    ours = attribution_patch(bridge, clean, corrupt, metric_fn, edge_config())
    assert set(ours.edge_scores) == set(theirs.edge_scores) and set(ours.node_scores) == set(theirs.node_scores)
    scale = max(abs(v) for v in theirs.edge_scores.values())
    for edge, value in theirs.edge_scores.items():
        assert ours.edge_scores[edge] == pytest.approx(value, rel=1e-7, abs=1e-10 * scale), edge
    for node, value in theirs.node_scores.items():
        assert ours.node_scores[node] == pytest.approx(value, rel=1e-7, abs=1e-10 * scale), node
    fixed = attribution_patch(bridge, clean, corrupt, metric_fn, edge_config(), method="atp+qk")
    assert set(fixed.edge_scores) == set(theirs.edge_scores)
    with pytest.raises(ValueError, match=r"method must be one of \('atp', 'atp\+qk', 'ig'\) at edge granularity"):
        attribution_patch(bridge, clean, corrupt, metric_fn, edge_config(), method="atp*")


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_faithfulness_equals_transformer_lens(setup, ablation):
    """TransformerLens's faithfulness of a top-edges circuit, per edge class too, for one pair."""
    from atp_plugin.tl_attribution import faithfulness
    bridge, clean, corrupt, metric_fn = setup
    circuit = original.attribution_patch(bridge, clean[:1], corrupt[:1], metric_fn, edge_config()).top_edges(k=40)
    config = original.FaithfulnessConfig(ablation=ablation)
    mean_tokens = clean[1:] if ablation == "mean" else None
    theirs = original.faithfulness(bridge, clean[:1], corrupt[:1], metric_fn, circuit, config, mean_tokens=mean_tokens)
    ours = faithfulness(bridge, clean[:1], corrupt[:1], metric_fn, circuit, config, mean_tokens=mean_tokens)
    for field in ("recovered", "full_metric", "corrupt_metric"):
        assert getattr(ours, field) == pytest.approx(getattr(theirs, field), rel=1e-8, abs=1e-10), field
    assert (ours.circuit_size, ours.total_edges, ours.edge_class_counts) == (
        theirs.circuit_size, theirs.total_edges, theirs.edge_class_counts)
    assert set(ours.edge_class_recovered) == set(theirs.edge_class_recovered)
    for edge_class, value in theirs.edge_class_recovered.items():
        assert ours.edge_class_recovered[edge_class] == pytest.approx(value, rel=1e-8, abs=1e-10), edge_class
    assert 0.05 < abs(theirs.recovered) and theirs.recovered != 1.0  # a circuit that tells the two apart

"""Edge scores (EAP) and exact edge patching against naive references written with TransformerLens
hooks (tests/edge_reference.py: per-head input hooks, one forward pass per edge), in float64, on
every model variant; plus the identities: first order is exact on a linear model, and a sender's
node AtP is the sum of its edge scores."""

from __future__ import annotations

import pytest

from conftest import HAS_HOOKED, MISSING

if not HAS_HOOKED:
    pytest.skip(MISSING["hooked"], allow_module_level=True)

import torch

import edge_reference as ref
from atp_plugin import attribute
from atp_plugin.edges import attribute_edges
from conftest import VARIANTS, logit_diff_metric, make_model, make_pairs

N, T = 2, 4


def setup(variant: str, n: int = N, t: int = T, **overrides):
    model = make_model(0, **{**VARIANTS[variant], **overrides})
    clean, corrupt = make_pairs(n, t)
    return model, clean, corrupt, logit_diff_metric(n)


def test_graph_names(variant):
    model, clean, corrupt, metric = setup(variant)
    result = attribute_edges(model, clean, corrupt, metric)
    assert sorted(result.graph.names) == sorted(e[0] for e in ref.edges(model))
    assert len(set(result.graph.names)) == result.graph.n_edges


@pytest.mark.parametrize("per_position", [True, False])
def test_atp_matches_naive_eap(variant, per_position):
    model, clean, corrupt, metric = setup(variant)
    names, per_pair = ref.eap(model, clean, corrupt, metric)  # [N, edges, T]
    if not per_position:
        per_pair = per_pair.sum(-1)
    result = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=per_position)
    order = [result.graph.edge_of[n] for n in names]
    torch.testing.assert_close(result.signed[order], per_pair.mean(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.scores[order], per_pair.abs().mean(0), rtol=1e-9, atol=1e-10)
    assert result.forward_passes == 2 * N and result.backward_passes == N


@pytest.mark.parametrize("per_position", [True, False])
def test_exact_matches_naive_patching(variant, per_position):
    """Per position on two layers and three tokens (one naive forward pass per edge and position)."""
    model, clean, corrupt, metric = setup(variant, t=3, n_layers=2) if per_position else setup(variant)
    names, per_pair = ref.exact(model, clean, corrupt, metric, per_position)
    result = attribute_edges(model, clean, corrupt, metric, method="ap", per_position=per_position,
                             patch_batch_size=50)
    order = [result.graph.edge_of[n] for n in names]
    torch.testing.assert_close(result.signed[order], per_pair.mean(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.scores[order], per_pair.mean(0).abs(), rtol=1e-9, atol=1e-10)


def test_verify_matches_naive_patching():
    model, clean, corrupt, metric = setup("ln_gelu", t=3, n_layers=2)
    names, per_pair = ref.exact(model, clean, corrupt, metric, per_position=True)
    result = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=True)
    checked = result.verify(12)
    assert checked.attrs["forward_passes"] == 2 * N + 12 * N  # clean + noise runs, one copy per pair and edge
    row = {n: i for i, n in enumerate(names)}
    want = torch.stack([per_pair[:, row[e], p] for e, p in zip(checked["edge"], checked["pos"])], 1)  # [N, 12]
    torch.testing.assert_close(torch.tensor(checked["effect"].to_numpy()), want.mean(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.tensor(checked["mean_abs_effect"].to_numpy()), want.abs().mean(0),
                               rtol=1e-9, atol=1e-10)
    top = result.top(12)
    assert list(checked["edge"]) == list(top["edge"]) and list(checked["estimate"]) == list(top["score"])


def test_first_order_is_exact_on_a_linear_model():
    model = ref.linear_model(make_model)
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    atp = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=True)
    exact = attribute_edges(model, clean, corrupt, metric, method="ap", per_position=True)
    torch.testing.assert_close(atp.signed, exact.signed, rtol=1e-9, atol=1e-11)
    assert float(exact.signed.abs().max()) > 0.01


@pytest.mark.parametrize("variant", ["ln_gelu", "parallel", "gqa"])
def test_sender_edge_scores_sum_to_its_node_atp(variant):
    """A sender's change dotted with dL/d(its write) is the sum over its receivers of its edge scores
    (the residual after the write is read by exactly those receivers): per pair and position, so
    also for the signed means."""
    model, clean, corrupt, metric = setup(variant, n=3, t=5)
    edges = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=True)
    nodes = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons", "resid_pre"], method="atp")
    g = edges.graph
    per_sender = torch.zeros(len(g.senders), edges.signed.shape[1], dtype=torch.float64)
    per_sender.index_add_(0, g.sender_index, edges.signed)
    for i, s in enumerate(g.senders):
        if s.kind == "embed":
            want = nodes.signed["resid_pre"][0]  # [pos]
        elif s.kind == "head":
            want = nodes.signed["attn_z"][s.layer, :, s.head]
        else:
            want = nodes.signed["mlp_neurons"][s.layer].sum(-1)
        torch.testing.assert_close(per_sender[i], want, rtol=1e-9, atol=1e-11)


def test_bad_input_fails_before_any_run():
    model, clean, corrupt, metric = setup("ln_gelu")
    with pytest.raises(ValueError, match="unknown edge method 'eap'"):
        attribute_edges(model, clean, corrupt, metric, method="eap")
    with pytest.raises(TypeError, match="per_position must be True or False"):
        attribute_edges(model, clean, corrupt, metric, per_position="yes")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        attribute_edges(model, clean, corrupt, metric, batch_size=-1)
    with pytest.raises(ValueError, match="clean has 2 prompts but corrupt has 1"):
        attribute_edges(model, clean, corrupt[:1], metric)
    result = attribute_edges(model, clean, corrupt, metric)
    with pytest.raises(ValueError, match="k must be at least 1"):
        result.top(0)


def test_unsupported_models_are_clear_errors():
    from atp_plugin.errors import UnsupportedModelError
    clean, corrupt = make_pairs(N, T)
    shortformer = make_model(0, n_layers=2, positional_embedding_type="shortformer")
    with pytest.raises(UnsupportedModelError, match="shortformer positional embeddings"):
        attribute_edges(shortformer, clean, corrupt, logit_diff_metric(N))
    model = make_model(0, n_layers=2)
    # a residual that is no longer embedding + writes: caught on the first batch
    model.blocks[1].hook_resid_post.add_hook(lambda x, hook: x * 1.5)
    with pytest.raises(UnsupportedModelError, match="layer 1 residual"):
        attribute_edges(model, clean, corrupt, logit_diff_metric(N))
    model.reset_hooks()


def test_verify_position_free_equals_exact():
    model, clean, corrupt, metric = setup("gqa")
    result = attribute_edges(model, clean, corrupt, metric, method="atp+qk")
    exact = attribute_edges(model, clean, corrupt, metric, method="ap")
    checked = result.verify(7)
    rows = [result.graph.edge_of[e] for e in checked["edge"]]
    torch.testing.assert_close(torch.tensor(checked["effect"].to_numpy()), exact.signed[rows], rtol=1e-12, atol=1e-14)
    assert checked.attrs["forward_passes"] == 2 * N + 7 * N and "pos" not in checked

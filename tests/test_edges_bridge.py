"""Edges on a TransformerBridge in compatibility mode: the same numbers as HookedTransformer on the
same weights (a random GPT-2 saved as a Hugging Face checkpoint and loaded both ways, float64); and
left-padded string pairs on that model."""

from __future__ import annotations

import pytest

from conftest import HAS_HOOKED, MISSING

if not HAS_HOOKED:
    pytest.skip(MISSING["hooked"], allow_module_level=True)

import torch  # noqa: E402

from atp_plugin import metrics  # noqa: E402
from atp_plugin.edges import attribute_edges  # noqa: E402
from hf_models import D_VOCAB, load_bridge, load_hooked, save_gpt2, save_llama  # noqa: E402

TOL = dict(rtol=1e-7, atol=1e-9)  # the Bridge processes weights at float32-level precision


def pairs(n: int = 3, t: int = 6, seed: int = 1):
    """Token pairs that differ at two positions, and a logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, D_VOCAB, (n, t), generator=g)
    corrupt = clean.clone()
    for pos in (1, t - 3):
        corrupt[:, pos] = torch.randint(2, D_VOCAB, (n,), generator=g)
    return clean, corrupt, metrics.logit_diff(torch.randint(2, D_VOCAB, (n,), generator=g),
                                              torch.randint(2, D_VOCAB, (n,), generator=g))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = save_gpt2(tmp_path_factory.mktemp("gpt2_edges"))
    return load_hooked(path), load_bridge(path)


@pytest.mark.parametrize("method", ["atp", "atp+qk", "ig"])
def test_first_order_edges_equal_hooked(models, method):
    hooked, bridge = models
    clean, corrupt, metric = pairs()
    want = attribute_edges(hooked, clean, corrupt, metric, method=method, per_position=True, ig_steps=3)
    got = attribute_edges(bridge, clean, corrupt, metric, method=method, per_position=True, ig_steps=3)
    assert got.graph.names == want.graph.names
    torch.testing.assert_close(got.signed, want.signed, **TOL)
    torch.testing.assert_close(got.scores, want.scores, **TOL)


def test_exact_edges_equal_hooked(models):
    hooked, bridge = models
    clean, corrupt, metric = pairs(n=2, t=4)
    want = attribute_edges(hooked, clean, corrupt, metric, method="ap")
    got = attribute_edges(bridge, clean, corrupt, metric, method="ap")
    torch.testing.assert_close(got.signed, want.signed, **TOL)
    assert float(want.signed.abs().max()) > 0.01


PROMPTS = [("w1 w2 w3 w4 w5", "w1 w9 w3 w4 w5"), ("w7 w8 w9", "w7 w8 w2"), ("w3 w4 w5 w6", "w3 w11 w5 w6")]


@pytest.mark.parametrize("method", ["atp", "atp+qk", "ap"])
def test_left_padded_pairs_equal_each_pair_alone(models, method):
    """Pairs of different lengths, left-padded together: each position's score is the mean over the
    pairs where it is a real token of what each pair gives run alone, unpadded."""
    hooked, _ = models
    metric = metrics.logit_diff([5, 6, 7], [8, 9, 10])
    together = attribute_edges(hooked, [c for c, _ in PROMPTS], [n for _, n in PROMPTS], metric, method=method,
                               per_position=True)
    t = together.scores.shape[1]
    sums = torch.zeros_like(together.signed)
    count = torch.zeros(t, dtype=torch.float64)
    for i, (c, n) in enumerate(PROMPTS):
        alone = attribute_edges(hooked, [c], [n], metrics.logit_diff([5 + i], [8 + i]), method=method,
                                per_position=True)
        width = alone.signed.shape[1]
        sums[:, t - width:] += alone.signed
        count[t - width:] += 1
    assert together.pairs.tolist() == count.long().tolist()
    torch.testing.assert_close(together.signed, sums / count, rtol=1e-9, atol=1e-10)


def test_llama_bridge_equals_hooked(tmp_path_factory):
    """Rotary, grouped-query attention, RMSNorm, no biases: atp, ig, exact edge patching and the edge
    QK fix (the Bridge host rotating changed queries and keys with the model's own cos and sin) as on
    HookedTransformer; the QK fix to 1e-5, Hugging Face's rotary and softmax running in float32."""
    # a neutral directory: TransformerLens reads an architecture into a path that names one ("llama")
    path = save_llama(tmp_path_factory.mktemp("tiny"))
    hooked, bridge = load_hooked(path), load_bridge(path)
    clean, corrupt, metric = pairs(n=2, t=5)
    for method in ("atp", "ig", "ap", "atp+qk"):
        want = attribute_edges(hooked, clean, corrupt, metric, method=method, ig_steps=2)
        got = attribute_edges(bridge, clean, corrupt, metric, method=method, ig_steps=2)
        assert got.graph.names == want.graph.names and "L1.KV1.v" in ",".join(got.graph.names)
        atol = 1e-5 * float(want.signed.abs().max()) if method == "atp+qk" else 1e-7
        torch.testing.assert_close(got.signed, want.signed, rtol=1e-6, atol=atol, msg=method)


def test_node_ig_equals_hooked(models):
    from atp_plugin import attribute
    from atp_plugin.backends.ig import IntegratedGradients
    hooked, bridge = models
    clean, corrupt, metric = pairs()
    want = attribute(hooked, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method=IntegratedGradients(3))
    got = attribute(bridge, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method=IntegratedGradients(3))
    for key in want.scores:
        torch.testing.assert_close(got.signed[key], want.signed[key], **TOL)

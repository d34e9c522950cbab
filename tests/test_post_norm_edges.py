"""Edges through post-norms (Gemma 2 and 3: norms before and after attention and MLP; OLMo 2: after
only), on float64 TransformerBridges, against the model's own hooks and modules.

Behind a post-norm a layer writes ``ln1_post(a)``, a = sum_h z_h W_O[h] + b_O, so the heads' writes
are not additive. The library's definition: a set of a layer's heads writes the change of the
normalised output when those heads alone are patched; a single head's first-order write is its
derivative. Checked here: a set of heads patched into one receiver against the model's own
``hook_attn_out`` with those heads' ``hook_z`` patched (the sum of each head's own change is not
it; agreement to the float32 rounding of the Bridge's attention); every edge patched is the corrupt
run (faithfulness 0) and none the clean run (1); a head's EAP over every receiver sums to its node
AtP at ``hook_z``. ``test_architectures`` holds each method on each family against its single-edge
reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from arch_reference import _read, _run
from atp_plugin import attribute
from atp_plugin.edges import attribute_edges, faithfulness
from helpers import bridge_pairs
from hf_models import load_bridge, save_family

FAMILIES = ["gemma2", "gemma3", "olmo2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = load_bridge(save_family(request.param, tmp_path_factory.mktemp(request.param)))
    if not hasattr(bridge.blocks[0], "ln1_post"):  # TransformerLens 3.9's OLMo 2 Bridge names them ln1/ln2
        pytest.skip(f"this TransformerLens's {request.param} Bridge does not name its post-norms ln1_post/ln2_post")
    return bridge


def test_a_set_of_heads_writes_the_change_of_the_normalised_output(model):
    """Every edge in the circuit but those from heads 0 and 2 of layer 0 into one receiver: that
    receiver alone reads the residual plus the change of layer 0's ``hook_attn_out`` when both
    heads' ``hook_z`` take their corrupt values together."""
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    graph = attribute_edges(model, clean, corrupt, metric, method="atp").graph
    heads, n = (0, 2), clean.shape[0]
    with torch.no_grad():
        _, c = _run(model, clean, [], ["blocks.0.hook_attn_out"])
        _, noise = _run(model, corrupt, [], ["blocks.0.attn.hook_z"])

        def both(x, hook):
            x = x.clone()
            x[:, :, heads] = noise["blocks.0.attn.hook_z"][:, :, heads]
            return x
        _, p = _run(model, clean, [("blocks.0.attn.hook_z", both)], ["blocks.0.hook_attn_out"])
        together = p["blocks.0.hook_attn_out"] - c["blocks.0.hook_attn_out"]
        # what adding up each head's own change would give instead: visibly not the same
        separate = torch.zeros_like(together)
        for h in heads:
            def one(x, hook, h=h):
                x = x.clone()
                x[:, :, h] = noise["blocks.0.attn.hook_z"][:, :, h]
                return x
            _, p = _run(model, clean, [("blocks.0.attn.hook_z", one)], ["blocks.0.hook_attn_out"])
            separate += p["blocks.0.hook_attn_out"] - c["blocks.0.hook_attn_out"]
        assert float((separate - together).abs().max()) > 1e-3 * float(together.abs().max())
        idx = torch.arange(n)
        base = metric(model(clean), idx).mean()
        corrupt_m = metric(model(corrupt), idx).mean()
    checked = 0
    for receiver in graph.receivers:
        if receiver.layer != 1 or receiver.kind not in ("q", "k", "v", "mlp"):
            continue
        with torch.no_grad():
            want_m = metric(model.run_with_hooks(clean, fwd_hooks=_read(model, clean, receiver, together, [])),
                            idx).mean()
        out = {f"L0.H{h} -> {receiver.name}" for h in heads}
        got = faithfulness(model, clean, corrupt, metric, [e for e in graph.names if e not in out])
        want = float((want_m - corrupt_m) / (base - corrupt_m))
        # the Bridge's Hugging Face attention rounds its rotary and softmax to float32 (test_architectures)
        assert got == pytest.approx(want, rel=0, abs=2e-6), receiver.name
        checked += 1
    assert checked >= 4


def test_every_edge_patched_is_the_corrupt_run(model):
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    graph = attribute_edges(model, clean, corrupt, metric, method="atp").graph
    assert faithfulness(model, clean, corrupt, metric, []) == pytest.approx(0.0, abs=1e-10)
    assert faithfulness(model, clean, corrupt, metric, graph.names) == pytest.approx(1.0, abs=1e-10)


def test_a_heads_edges_sum_to_its_node_atp(model):
    """A head's first-order write is the derivative of the normalised output, so its EAP summed over
    every receiver (and position) is its node AtP at ``hook_z``."""
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    edges = attribute_edges(model, clean, corrupt, metric, method="atp")
    nodes = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", progress=False)
    g = edges.graph
    for s, sender in enumerate(g.senders):
        if sender.kind != "head":
            continue
        got = float(edges.signed[g.sender_index == s].sum())
        want = float(nodes.signed["attn_z"][sender.layer, :, sender.head].sum())
        # Hugging Face's RMSNorm computes in float32 even in a float64 model, and the edge side takes
        # the post-norm's derivative forwards (J d), the node side backwards (J^T g): 1e-8 apart
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9 * float(nodes.signed["attn_z"].abs().max())), \
            sender.name


@pytest.mark.parametrize("method", ["atp", "atp+qk", "ig", "ap"])
def test_hooked_transformer_with_post_norms(method):
    """TransformerLens 3's HookedTransformer with norms before and after attention and MLP (its
    Gemma 2 layout: ``use_normalization_before_and_after``; rotary, grouped-query attention,
    soft-capped scores), float64 throughout: every edge method equals its hook-only reference
    (``arch_reference``), and every edge patched is the corrupt run."""
    from conftest import HAS_HOOKED, MISSING, make_model
    if not HAS_HOOKED:
        pytest.skip(MISSING["hooked"])
    from arch_reference import check

    model = make_model(0, n_layers=2, normalization_type="RMS", use_normalization_before_and_after=True,
                       positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2, act_fn="gelu",
                       gated_mlp=True, attn_scores_soft_cap=5.0)
    clean, corrupt, metric = bridge_pairs(n=2, t=5)
    got = check(model, "edge", method, clean, corrupt, metric)
    assert not isinstance(got, str), got
    assert got <= 1e-11, f"relative error {got:.2g}"
    if method == "ap":
        assert faithfulness(model, clean, corrupt, metric, []) == pytest.approx(0.0, abs=1e-12)

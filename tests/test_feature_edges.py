"""Feature edges (``attribute_edges(features=...)``) on a float64 HookedTransformer against the
naive references of ``feature_reference`` (hooks and the dictionaries' own encode/decode).

Dictionaries: an SAE on layer 0's attention output, an SAE on layer 0's MLP output and a
transcoder from layer 1's ln2 input into its MLP output; SAE-free (``saes.SimpleSAE``) and
SAE-Lens's (StandardSAE, Transcoder). Checked: EAP and exact patching of every edge, the QK fix on
edges from features into queries and keys, a feature's node AtP as the sum of its outgoing
edges, first order = exact on a linear model, the graph's completeness (every edge patched is the
corrupt run), verify and bad input.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens", reason="needs TransformerLens")
try:
    from transformer_lens import HookedTransformer  # noqa: F401
except ImportError:
    pytest.skip("needs HookedTransformer, which TransformerLens 4 removed (pip install 'transformer-lens<4')",
                allow_module_level=True)

import feature_reference as ref
from atp_plugin import attribute
from atp_plugin.adapters import SAEFeatures, TranscoderFeatures
from atp_plugin.edges import (
    Circuit,
    attribute_edges,
    evaluate_edges,
    faithfulness,
    faithfulness_of,
    left_out,
    top_circuit,
)
from atp_plugin.edges.features import _GATED
from atp_plugin.errors import UnsupportedModelError
from conftest import logit_diff_metric, make_model, make_pairs
from edge_reference import linear_model, split_model
from helpers import random_simple_sae

N, T, D_SAE = 3, 5, 16


def simple(seed: int, hook: str, hook_out: str | None = None, activation=torch.relu):
    return random_simple_sae(seed, hook, hook_out, d_sae=D_SAE, activation=activation)


def sae_lens_dicts() -> list:
    from helpers import make_sae, make_transcoder
    return [make_sae("standard", "blocks.0.hook_attn_out", d_sae=D_SAE, seed=1),
            make_sae("topk", "blocks.0.hook_mlp_out", d_sae=D_SAE, seed=2),
            make_transcoder("jumprelu", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", seed=3)]


def simple_dicts() -> list:
    return [simple(1, "blocks.0.hook_attn_out"), simple(2, "blocks.0.hook_mlp_out"),
            simple(3, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")]


KEPT = [[1, 4, 7], [0, 5], [2, 3, 9]]


def setup(kind: str):
    model = make_model(7)
    with torch.no_grad():  # ln2's weight and bias away from 1 and 0: a transcoder reads before them
        for block in model.blocks:
            block.ln2.w.mul_(1 + 0.3 * torch.randn_like(block.ln2.w))
            block.ln2.b.add_(0.2 * torch.randn_like(block.ln2.b))
    if kind == "sae_lens":
        pytest.importorskip("sae_lens")
    saes = sae_lens_dicts() if kind == "sae_lens" else simple_dicts()
    adapters = [SAEFeatures(saes[0]), SAEFeatures(saes[1]), TranscoderFeatures(saes[2])]
    dicts = [ref.Dict("attn", 0, saes[0], "blocks.0.hook_attn_out", "blocks.0.hook_attn_out", KEPT[0]),
             ref.Dict("mlp", 0, saes[1], "blocks.0.hook_mlp_out", "blocks.0.hook_mlp_out", KEPT[1]),
             ref.Dict("mlp", 1, saes[2], "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", KEPT[2])]
    keep = {a.name: k for a, k in zip(adapters, KEPT)}
    clean, corrupt = make_pairs(N, T)
    return model, adapters, dicts, keep, clean, corrupt, logit_diff_metric(N)


def compare(result, want: dict[str, tuple[float, float]], exact: bool) -> None:
    names = result.graph.names
    assert sorted(names) == sorted(want), set(names) ^ set(want)
    signed = torch.tensor([want[n][0] for n in names], dtype=torch.float64)
    scale = signed.abs().max()
    assert float((result.signed - signed).abs().max()) <= 1e-9 * scale
    expect = signed.abs() if exact else torch.tensor([want[n][1] for n in names], dtype=torch.float64)
    assert float((result.scores - expect).abs().max()) <= 1e-9 * scale


@pytest.mark.parametrize("kind", ["simple", "sae_lens"])
def test_atp_and_exact_equal_naive_feature_edges(kind: str) -> None:
    """EAP twice: the first run finds each MLP dictionary's encoder linear where active (its reads'
    shortcut, checked against the full backward on that batch), the second runs the shortcut."""
    model, adapters, dicts, keep, clean, corrupt, metric = setup(kind)
    for method, exact in (("atp", False), ("atp", False), ("ap", True)):
        result = attribute_edges(model, clean, corrupt, metric, method=method, features=adapters, keep=keep)
        compare(result, ref.effects(model, clean, corrupt, metric, dicts, first_order=not exact), exact)
    assert all(_GATED[a.sae] for a in adapters[1:])  # the shortcut ran on the second EAP


def test_qk_fix_on_feature_edges_equals_the_models_own_pattern_change() -> None:
    """Edges from features into layer 1's queries and keys, per position: the exact change of layer
    1's pattern when that head alone reads the changed residual at that position, dotted with
    dL/dpattern."""
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    result = attribute_edges(model, clean, corrupt, metric, method="atp+qk", features=adapters, keep=keep,
                             per_position=True)
    split = split_model(model)
    w_clean, w_noise = ref.writes(split, model, clean, dicts), ref.writes(split, model, corrupt, dicts)
    pattern = "blocks.1.attn.hook_pattern"
    with torch.enable_grad():
        store = {}

        def keep_grad(x, hook):
            x.retain_grad()
            store["A"] = x
            return x
        ref.bound(metric)(split.run_with_hooks(clean, fwd_hooks=[(pattern, keep_grad)])).sum().backward()
    a, g = store["A"].detach(), store["A"].grad
    checked = 0
    for i, name in enumerate(result.graph.names):
        s, r = name.split(" -> ")
        if not (r.startswith("L1.") and r[-1] in "qk") or not s.startswith(("attn0.", "mlp0.")):
            continue
        head, which = int(r.split(".")[1][1:]), r[-1]
        for t in range(T):
            d = torch.zeros_like(w_clean[s])
            d[:, t] = w_noise[s][:, t] - w_clean[s][:, t]
            got = {}

            def add(x, hook, d=d, head=head):
                x = x.clone()
                x[:, :, head] = x[:, :, head] + d
                return x

            def grab(x, hook, got=got):
                got["A"] = x
                return x
            with torch.no_grad():
                split.run_with_hooks(clean, fwd_hooks=[(f"blocks.1.hook_{which}_input", add), (pattern, grab)])
            per_pair = ((got["A"] - a) * g).flatten(1).sum(1)
            tol = 1e-9 * max(1.0, float(per_pair.abs().max()))
            assert abs(float(result.signed[i, t]) - float(per_pair.mean())) <= tol
            assert abs(float(result.scores[i, t]) - float(per_pair.abs().mean())) <= tol
        checked += 1
    assert checked == 2 * 4 * (5 + 4)  # q and k of 4 heads, from 5 + 4 nodes of the two layer-0 dictionaries


def test_a_features_node_atp_is_the_sum_of_its_outgoing_edges() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    edges = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    nodes = attribute(model, clean, corrupt, metric, nodes=adapters, method="atp")
    frame = edges.to_frame()
    for adapter, dic in zip(adapters, dicts):
        per_node = {f"{dic.prefix}.f{i}": nodes.signed[adapter.name][:, i].sum() for i in dic.kept}
        per_node[f"{dic.prefix}.error"] = nodes.signed[adapter.name + ".error"].sum()
        for sender, want in per_node.items():
            got = frame.loc[frame.sender == sender, "signed"].sum()
            assert abs(got - float(want)) <= 1e-9 * max(1.0, abs(float(want))), sender


def test_first_order_is_exact_on_a_linear_model() -> None:
    """Attention-only, no norms, W_Q = W_K = 0, and an SAE with the identity activation on each
    attention output: the metric is affine in every feature, so EAP, EAP-IG and exact patching agree."""
    model = linear_model(make_model, n_layers=2)
    adapters = [SAEFeatures(simple(10 + layer, f"blocks.{layer}.hook_attn_out", activation=lambda x: x))
                for layer in range(2)]
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    keep = {a.name: [0, 3, 5] for a in adapters}
    exact = attribute_edges(model, clean, corrupt, metric, method="ap", features=adapters, keep=keep)
    assert any(s.kind == "feature" for s in exact.graph.senders)
    for method in ("atp", "ig"):
        got = attribute_edges(model, clean, corrupt, metric, method=method, features=adapters, keep=keep)
        assert torch.allclose(got.signed, exact.signed, rtol=0, atol=1e-10 * float(exact.signed.abs().max()))


def test_the_feature_graph_is_complete() -> None:
    """Every edge patched at once is the corrupt run (the rest nodes carry the features not kept);
    no edge patched is the clean run; faithfulness of the full graph is 1, of the empty one 0."""
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    result = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    n = result.graph.n_edges
    clean_m, corrupt_m, (everything,) = result.context.circuit_metrics([torch.ones(n, dtype=torch.bool)])
    assert abs(everything - corrupt_m) <= 1e-10 * abs(clean_m - corrupt_m)
    assert abs(corrupt_m - float(ref.bound(metric)(model(corrupt)).mean())) <= 1e-12
    full = Circuit(result.graph, torch.ones(n, dtype=torch.bool))
    empty = Circuit(result.graph, torch.zeros(n, dtype=torch.bool))
    assert faithfulness_of(result, [full, empty]) == [1.0, 0.0]
    circuit = top_circuit(result, 40)  # faithfulness() runs a feature circuit on its own graph
    assert faithfulness(model, clean, corrupt, metric, circuit) == pytest.approx(faithfulness_of(result, [circuit])[0],
                                                                              rel=1e-12)
    mean = faithfulness_of(result, [full], ablation="mean", mean_tokens=make_pairs(4, T, seed=9)[0])
    assert abs(mean[0] - 1) <= 1e-12


def test_keep_picks_the_top_features_by_node_atp() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    nodes = attribute(model, clean, corrupt, metric, nodes=adapters, method="atp")
    result = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=2)
    for adapter, dic in zip(adapters, dicts):
        score = nodes.scores[adapter.name].sum(0)
        want = sorted(torch.argsort(score, descending=True, stable=True)[:2].tolist())
        got = sorted(s.index for s in result.graph.senders if s.name.startswith(dic.prefix + ".f"))
        assert got == want
    assert result.forward_passes == 2 * N + 2 * N  # the node run, then EAP: 2 forward passes per pair each


def test_verify_feature_edges() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    result = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    want = ref.effects(model, clean, corrupt, metric, dicts, first_order=False)
    table = result.verify(6)
    for _, row in table.iterrows():
        assert abs(row.effect - want[row.edge][0]) <= 1e-9 * max(1.0, abs(want[row.edge][0]))


def test_bad_features_are_clear_errors() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    with pytest.raises(UnsupportedModelError, match="cannot be an edge node"):  # the embedding's own hook
        attribute_edges(model, clean, corrupt, metric, features=[SAEFeatures(simple(4, "blocks.0.hook_resid_pre"))])
    with pytest.raises(ValueError, match="one point of the residual stream"):
        same = [SAEFeatures(simple(4, "blocks.0.hook_resid_post")), SAEFeatures(simple(5, "blocks.1.hook_resid_pre"))]
        attribute_edges(model, clean, corrupt, metric, features=same, keep=1)
    with pytest.raises(ValueError, match="two dictionaries on one component"):
        twice = [adapters[1], SAEFeatures(simple(5, "blocks.0.hook_mlp_out"), name="other")]
        attribute_edges(model, clean, corrupt, metric, features=twice, keep=1)
    with pytest.raises(ValueError, match="keep= must be"):
        attribute_edges(model, clean, corrupt, metric, features=adapters, keep=-1)
    with pytest.raises(ValueError, match="do not exist"):
        attribute_edges(model, clean, corrupt, metric, features=adapters, keep={adapters[0].name: [99]})
    with pytest.raises(TypeError, match="SAEFeatures or TranscoderFeatures"):
        attribute_edges(model, clean, corrupt, metric, features=["sae"])
    with pytest.raises(UnsupportedModelError, match="MLP's input"):
        attribute_edges(model, clean, corrupt, metric,
                        features=[TranscoderFeatures(simple(6, "blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"))])


def test_left_out_is_the_rest_patched_at_its_site() -> None:
    """Every edge out of a dictionary's rest node patched = the features it did not keep swapped
    for their corrupt values where the dictionary writes (every reader after it sees them)."""
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    result = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    table = left_out(result)
    split = split_model(model)
    w_clean, w_noise = ref.writes(split, model, clean, dicts), ref.writes(split, model, corrupt, dicts)
    m = ref.bound(metric)
    with torch.no_grad():
        base, bad = float(m(model(clean)).mean()), float(m(model(corrupt)).mean())
        for dic, row in zip(dicts, table.itertuples()):
            d = w_noise[f"{dic.prefix}.rest"] - w_clean[f"{dic.prefix}.rest"]
            hooks = [(dic.hook, lambda x, hook, d=d: x + d)]
            want = float(m(model.run_with_hooks(clean, fwd_hooks=hooks)).mean()) - base
            assert row.dictionary == dic.prefix
            assert abs(row.effect - want) <= 1e-10 * max(1.0, abs(want))
            assert abs(row.fraction - want / (bad - base)) <= 1e-10


def test_cost_of_verification_on_feature_edges() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    curves, truth = evaluate_edges(model, clean, corrupt, metric, methods=("atp",), top_x=5, features=adapters, keep=2)
    nodes = 2 * N + 2 * N  # the node run that chose the features: 2 forward passes per pair and 1 backward (x2)
    edge_atp = 2 * N + 2 * N
    assert curves.loc[0, "atp"] == nodes + edge_atp
    assert (curves["atp"].diff().dropna() >= 0).all() and curves.loc[5, "oracle"] == 5 * N
    assert sorted(s.index for s in truth.graph.senders if s.name.startswith("mlp1.f")) == sorted(
        torch.argsort(attribute(model, clean, corrupt, metric, nodes=adapters, method="atp")
                      .scores[adapters[2].name].sum(0), descending=True, stable=True)[:2].tolist())


def test_auto_batch_size_is_refused_with_features() -> None:
    model, adapters, dicts, keep, clean, corrupt, metric = setup("simple")
    with pytest.raises(ValueError, match="batch_size='auto'"):
        attribute_edges(model, clean, corrupt, metric, features=adapters, keep=keep, batch_size="auto")


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
def test_an_sae_on_the_residual_stream_is_a_bottleneck(hook: str) -> None:
    """An SAE between the layers (or before the logits) with a transcoder on layer 1's MLP: no edge
    crosses it but through its nodes; EAP and exact patching of every edge equal the naive
    references, a feature's node AtP is the sum of its outgoing edges, and the graph is complete."""
    model, _, _, _, clean, corrupt, metric = setup("simple")
    sae, tc = simple(21, hook), simple(3, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    adapters = [SAEFeatures(sae), TranscoderFeatures(tc)]
    layer = 1
    dicts = [ref.Dict("resid", layer, sae, hook, hook, [0, 6, 9]),
             ref.Dict("mlp", 1, tc, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", [2, 3])]
    keep = {adapters[0].name: [0, 6, 9], adapters[1].name: [2, 3]}
    for method, exact in (("atp", False), ("ap", True)):
        result = attribute_edges(model, clean, corrupt, metric, method=method, features=adapters, keep=keep)
        compare(result, ref.effects(model, clean, corrupt, metric, dicts, first_order=not exact), exact)
    prefix = dicts[0].prefix
    names = set(result.graph.names)
    assert "embed -> logits" not in names
    assert {f"{prefix}.error -> logits", f"{prefix}.rest -> logits"} <= names
    if hook.endswith("resid_pre"):
        assert "L0.H0 -> L1.H0.q" not in names and "embed -> L0.H0.q" in names and f"{prefix}.f6 -> L1.H0.q" in names
    else:
        assert "mlp1.f2 -> logits" not in names and "L1.H0 -> mlp1.f2" in names
    edges = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    nodes = attribute(model, clean, corrupt, metric, nodes=adapters[:1], method="atp")
    frame = edges.to_frame()
    for i in dicts[0].kept:
        want = float(nodes.signed[adapters[0].name][:, i].sum())
        assert abs(frame.loc[frame.sender == f"{prefix}.f{i}", "signed"].sum() - want) <= 1e-9 * max(1.0, abs(want))
    every = torch.ones(edges.graph.n_edges, dtype=torch.bool)
    clean_m, corrupt_m, (everything,) = edges.context.circuit_metrics([every])
    assert abs(everything - corrupt_m) <= 1e-10 * abs(clean_m - corrupt_m)

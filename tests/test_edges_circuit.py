"""Circuits: faithfulness against a naive reference written with TransformerLens hooks, 1 for the
full graph and 0 for the empty circuit, dangling-edge pruning, and the MIB curve summaries."""

from __future__ import annotations

import pytest

from conftest import HAS_HOOKED, MISSING

if not HAS_HOOKED:
    pytest.skip(MISSING["hooked"], allow_module_level=True)

import numpy as np
import torch

import edge_reference as ref
from atp_plugin.edges import (
    Circuit,
    attribute_edges,
    faithfulness,
    faithfulness_by_class,
    faithfulness_curve,
    faithfulness_of,
    pruned,
    threshold_circuit,
    top_circuit,
)
from conftest import VARIANTS, logit_diff_metric, make_model, make_pairs

N, T = 3, 5


def setup(variant: str = "ln_gelu"):
    model = make_model(0, **VARIANTS[variant])
    clean, corrupt = make_pairs(N, T)
    return model, clean, corrupt, logit_diff_metric(N)


@pytest.mark.parametrize("variant", ["ln_gelu", "parallel", "gqa", "attn_only"])
def test_faithfulness_matches_naive(variant):
    model, clean, corrupt, metric = setup(variant)
    result = attribute_edges(model, clean, corrupt, metric)
    names = result.graph.names
    g = torch.Generator().manual_seed(5)
    for keep_fraction in (0.2, 0.7):
        kept = {n for n in names if float(torch.rand(1, generator=g)) < keep_fraction}
        clean_m, corrupt_m = ref.circuit_metric(model, clean, corrupt, metric, set(names)), \
            ref.circuit_metric(model, clean, corrupt, metric, set())
        circuit_m = ref.circuit_metric(model, clean, corrupt, metric, kept)
        want = float((circuit_m.mean() - corrupt_m.mean()) / (clean_m.mean() - corrupt_m.mean()))
        got = faithfulness(model, clean, corrupt, metric, sorted(kept))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("variant", ["ln_gelu", "parallel", "gqa"])
def test_mean_ablation_matches_naive(variant):
    """TransformerLens 4.3's ablation="mean": an edge outside the circuit carries its sender's write
    averaged over held-out calibration prompts; recovery still normalised by the clean/corrupt gap."""
    model, clean, corrupt, metric = setup(variant)
    calibration = make_pairs(7, T, seed=11)[0]
    result = attribute_edges(model, clean, corrupt, metric)
    names = result.graph.names
    clean_m = ref.circuit_metric(model, clean, corrupt, metric, set(names)).mean()
    corrupt_m = ref.circuit_metric(model, clean, corrupt, metric, set()).mean()
    g = torch.Generator().manual_seed(5)
    for kept in (set(), {n for n in names if float(torch.rand(1, generator=g)) < 0.5}, set(names)):
        circuit_m = ref.circuit_metric(model, clean, corrupt, metric, kept, mean_tokens=calibration).mean()
        want = float((circuit_m - corrupt_m) / (clean_m - corrupt_m))
        got = faithfulness(model, clean, corrupt, metric, sorted(kept), ablation="mean", mean_tokens=calibration)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-10), len(kept)
        (of,) = faithfulness_of(result, [Circuit.from_names(result.graph, sorted(kept))], ablation="mean",
                                mean_tokens=calibration)
        assert of == pytest.approx(want, rel=1e-9, abs=1e-10)
    assert abs(faithfulness(model, clean, corrupt, metric, [], ablation="mean", mean_tokens=calibration)) > 1e-3
    with pytest.raises(ValueError, match="needs mean_tokens"):
        faithfulness(model, clean, corrupt, metric, [], ablation="mean")
    with pytest.raises(ValueError, match=r"calibration prompt\(s\) \[1\] equal a clean or corrupt prompt"):
        faithfulness(model, clean, corrupt, metric, [], ablation="mean", mean_tokens=torch.stack([calibration[0],
                                                                                                  corrupt[2]]))
    with pytest.raises(ValueError, match="must have the pairs' length, 5 tokens"):
        faithfulness(model, clean, corrupt, metric, [], ablation="mean", mean_tokens=calibration[:, :4])
    with pytest.raises(ValueError, match="ablation must be 'corrupt'"):
        faithfulness(model, clean, corrupt, metric, [], ablation="zero")


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_faithfulness_by_class_matches_naive(ablation):
    """Per edge class, the circuit's recovery with that class's kept edges removed too, against the
    naive circuit run; a class the circuit lacks gets the aggregate."""
    model, clean, corrupt, metric = setup("ln_gelu")
    calibration = make_pairs(7, T, seed=11)[0] if ablation == "mean" else None
    result = attribute_edges(model, clean, corrupt, metric)
    names = result.graph.names
    g = torch.Generator().manual_seed(3)
    kept = {n for n in names if n.endswith((".q", ".k", ".v", "logits"))  # no edge into an MLP
            and float(torch.rand(1, generator=g)) < 0.6}
    clean_m = ref.circuit_metric(model, clean, corrupt, metric, set(names)).mean()
    corrupt_m = ref.circuit_metric(model, clean, corrupt, metric, set()).mean()

    def naive(edges: set[str]) -> float:
        m = ref.circuit_metric(model, clean, corrupt, metric, edges, mean_tokens=calibration).mean()
        return float((m - corrupt_m) / (clean_m - corrupt_m))

    classes = {"into_qk": (".q", ".k"), "into_v": (".v",), "into_logits": ("logits",)}
    got = faithfulness_by_class(result, sorted(kept), ablation=ablation, mean_tokens=calibration)
    assert set(got) == {"all", "into_qk", "into_v", "into_mlp", "into_logits"}
    assert got["all"] == pytest.approx(naive(kept), rel=1e-9, abs=1e-10)
    assert got["into_mlp"] == got["all"]  # the circuit keeps no edge into an MLP
    for name, ends in classes.items():
        want = naive({n for n in kept if not n.endswith(ends)})
        assert got[name] == pytest.approx(want, rel=1e-9, abs=1e-10), name


def test_full_graph_is_one_and_empty_circuit_is_zero(variant):
    model, clean, corrupt, metric = setup(variant)
    result = attribute_edges(model, clean, corrupt, metric, per_position=True)
    full = Circuit(result.graph, torch.ones_like(result.scores, dtype=torch.bool))
    empty = Circuit(result.graph, torch.zeros(result.graph.n_edges, dtype=torch.bool))
    assert faithfulness(model, clean, corrupt, metric, full) == 1.0
    assert faithfulness(model, clean, corrupt, metric, empty) == 0.0  # by definition: it is not run
    _, corrupt_m, (patched,) = result.context.circuit_metrics([~empty.keep])  # run, it is the corrupt run
    assert patched == pytest.approx(corrupt_m, abs=1e-12)
    assert faithfulness(model, clean, corrupt, metric, list(result.graph.names)) == 1.0


def names_circuit(graph, names: list[str], per_pos: dict[str, list[int]] | None = None, t: int = T) -> Circuit:
    if per_pos is None:
        return Circuit.from_names(graph, names)
    keep = torch.zeros(graph.n_edges, t, dtype=torch.bool)
    for name, positions in per_pos.items():
        keep[graph.edge_of[name], positions] = True
    return Circuit(graph, keep)


def test_pruning_by_hand():
    model, clean, corrupt, metric = setup()
    g = attribute_edges(model, clean, corrupt, metric).graph
    assert pruned(names_circuit(g, ["L0.H1 -> logits"])).edges() == []  # nothing feeds L0.H1
    assert pruned(names_circuit(g, ["embed -> L0.H1.q"])).edges() == []  # L0.H1 feeds nothing
    chain = ["embed -> L0.H1.v", "L0.H1 -> mlp1", "mlp1 -> L2.H0.k", "L2.H0 -> logits"]
    assert sorted(pruned(names_circuit(g, chain)).edges()) == sorted(chain)
    assert pruned(names_circuit(g, chain[:3])).edges() == []
    # per position: a key at s feeds the head's outputs at t >= s only
    late = names_circuit(g, [], {"embed -> L0.H1.k": [2], "L0.H1 -> logits": [1]})
    assert not bool(pruned(late).keep.any())
    later = names_circuit(g, [], {"embed -> L0.H1.k": [2], "L0.H1 -> logits": [3]})
    assert torch.equal(pruned(later).keep, later.keep)
    query = names_circuit(g, [], {"embed -> L0.H1.q": [2], "L0.H1 -> logits": [3]})  # a query acts at its position
    assert not bool(pruned(query).keep.any())


def check_no_dangling(circuit: Circuit) -> None:
    """Every kept edge's sender is the embedding or has a kept edge in, and its receiver is the
    logits or its component has a kept edge out (position-free: any position)."""
    g = circuit.graph
    kept = circuit.keep.any(-1) if circuit.per_position else circuit.keep
    ins, outs = set(), set()
    for e in kept.nonzero().flatten().tolist():
        s, r = g.senders[int(g.sender_index[e])], g.receivers[int(g.receiver_index[e])]
        outs.add(s.name)
        group = g.n_heads // g.n_kv
        heads = [r.head] if r.kind == "q" else range(r.head * group, (r.head + 1) * group)
        ins |= {f"L{r.layer}.H{h}" for h in heads} if r.kind in "qkv" else {r.name}
    for e in kept.nonzero().flatten().tolist():
        s, r = g.senders[int(g.sender_index[e])], g.receivers[int(g.receiver_index[e])]
        assert s.kind == "embed" or s.name in ins, g.names[e]
        assert r.kind == "logits" or (r.kind == "mlp" and r.name in outs) or \
            (r.kind in "qkv" and any(f"L{r.layer}.H{h}" in outs for h in range(g.n_heads))), g.names[e]


@pytest.mark.parametrize("variant", ["ln_gelu", "gqa", "parallel"])
def test_pruning_random_circuits(variant):
    model, clean, corrupt, metric = setup(variant)
    result = attribute_edges(model, clean, corrupt, metric, per_position=True)
    g = torch.Generator().manual_seed(0)
    for fraction in (0.05, 0.2, 0.5):
        for keep in (torch.rand(result.graph.n_edges, generator=g) < fraction,
                     torch.rand(result.graph.n_edges, T, generator=g) < fraction):
            c = pruned(Circuit(result.graph, keep))
            assert not bool((c.keep & ~keep).any())  # pruning only removes
            assert torch.equal(pruned(c).keep, c.keep)  # and is done in one pass
            check_no_dangling(c)
    full = Circuit(result.graph, torch.ones(result.graph.n_edges, dtype=torch.bool))
    assert torch.equal(pruned(full).keep, full.keep)


def test_top_and_threshold_circuits():
    model, clean, corrupt, metric = setup()
    result = attribute_edges(model, clean, corrupt, metric)
    order = torch.argsort(result.scores, descending=True, stable=True)
    top = top_circuit(result, 10, prune=False)
    assert set(top.keep.nonzero().flatten().tolist()) == set(order[:10].tolist())
    cut = float(result.scores[order[9]])
    assert torch.equal(threshold_circuit(result, cut, prune=False).keep, result.scores >= cut)
    assert torch.equal(top_circuit(result, 10).keep, pruned(top).keep)
    signed = top_circuit(result, 5, prune=False, rank="signed")
    want = torch.argsort(-result.signed, descending=True)[:5]
    assert set(signed.keep.nonzero().flatten().tolist()) == set(want.tolist())


def test_faithfulness_curve_and_mib_summaries():
    model, clean, corrupt, metric = setup()
    result = attribute_edges(model, clean, corrupt, metric)
    ps = (0.01, 0.05, 0.2, 0.5, 1.0)
    curve = faithfulness_curve(result, ps)
    n = result.graph.n_edges
    assert curve.sizes == tuple(int(p * n) for p in ps)
    want = [faithfulness(model, clean, corrupt, metric, top_circuit(result, size)) for size in curve.sizes]
    np.testing.assert_allclose(curve.faithfulness, want, rtol=1e-9, atol=1e-12)
    assert curve.faithfulness[-1] == 1.0
    assert curve.cpr == pytest.approx(np.trapezoid(want, ps), rel=1e-12)
    assert curve.cmd == pytest.approx(np.trapezoid(np.abs(1 - np.array(want)), ps), rel=1e-12)
    assert curve.kept[0] == 0 and curve.faithfulness[0] == 0.0  # the smallest circuit is pruned empty
    # clean + corrupt + one patched run per size and pair, but for the empty circuit (the corrupt run)
    assert curve.forward_passes == N * (2 + len(ps) - 1)


def test_bad_circuits():
    model, clean, corrupt, metric = setup()
    with pytest.raises(ValueError, match="not in this model's graph"):
        faithfulness(model, clean, corrupt, metric, ["L9.H0 -> logits"])
    with pytest.raises(TypeError, match="not one string"):
        faithfulness(model, clean, corrupt, metric, "embed -> logits")
    result = attribute_edges(model, clean, corrupt, metric)
    with pytest.raises(ValueError, match="percentages"):
        faithfulness_curve(result, (0.5, 0.1))
    with pytest.raises(ValueError, match="same on the clean and the corrupt"), \
            pytest.warns(UserWarning, match="equals"):
        faithfulness(model, clean, clean, metric, ["embed -> logits"])


def test_cost_of_verification_curves():
    """Each curve: the method's own cost (forward + 2 x backward passes of one prompt) plus one
    patched forward pass per pair for every edge down to the last of the true top x (by exact
    patching) in the method's order."""
    from atp_plugin.edges.evaluate import evaluate_edges
    model, clean, corrupt, metric = setup()
    curves, truth = evaluate_edges(model, clean, corrupt, metric, methods=("atp", "ig"), ig_steps=2, top_x=6)
    exact = attribute_edges(model, clean, corrupt, metric, method="ap")
    torch.testing.assert_close(truth.signed, exact.signed, rtol=0, atol=0)
    true_top = torch.argsort(exact.scores, descending=True)[:6].tolist()
    for method, own in (("atp", 2 * N + 2 * N), ("ig", (1 + 2) * N + 2 * 2 * N)):
        scores = attribute_edges(model, clean, corrupt, metric, method=method, ig_steps=2).scores
        rank = {e: i + 1 for i, e in enumerate(torch.argsort(scores, descending=True).tolist())}
        deepest = [max(rank[e] for e in true_top[:x]) for x in range(1, 7)]
        assert curves[method].tolist() == [own] + [own + N * d for d in deepest]
    assert curves["oracle"].tolist() == [N * x for x in range(7)]
    with pytest.raises(ValueError, match="methods must be edge methods"):
        evaluate_edges(model, clean, corrupt, metric, methods=("ap",))

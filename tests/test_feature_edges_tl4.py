"""Feature edges on a TransformerLens 4 TransformerBridge (float64 GPT-2, SAE-Lens-free
``saes.SimpleSAE`` dictionaries: an SAE on layer 0's attention output, a transcoder from layer 0's
ln2 input into its MLP output, an SAE on layer 1's MLP output; the transcoder also a sparsify one)
against a naive reference written
here with the Bridge's own hooks and modules: every edge into a dictionary node or the logits, EAP
(the derivative of the patched metric in the size of the change, by autograd) and exact patching;
a feature's node AtP is the sum of its outgoing edges; every edge patched is the corrupt run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge", reason="needs TransformerLens 4's TransformerBridge")
import feature_reference as ref  # noqa: E402
from atp_plugin import attribute, metrics  # noqa: E402
from atp_plugin.adapters import SAEFeatures, TranscoderFeatures  # noqa: E402
from atp_plugin.edges import attribute_edges  # noqa: E402
from helpers import random_simple_sae, sparsify_coder  # noqa: E402
from hf_models import D_VOCAB, load_bridge, save_gpt2  # noqa: E402

N, T, D_SAE = 3, 5, 16
PLACES = [("attn", 0, "blocks.0.hook_attn_out", "blocks.0.hook_attn_out", [2, 5, 11]),
          ("mlp", 0, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", [1, 3]),
          ("mlp", 1, "blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out", [0, 7, 8])]


@pytest.fixture(scope="module", params=["simple", "sparsify"])
def setup(request, tmp_path_factory):
    """The dictionaries, with layer 0's transcoder a ``SimpleSAE`` or a sparsify transcoder."""
    model = load_bridge(save_gpt2(tmp_path_factory.mktemp("gpt2")))
    coders = [random_simple_sae(i, hook_in, None if hook_in == hook else hook, d_sae=D_SAE)
              for i, (_, _, hook_in, hook, _) in enumerate(PLACES)]
    if request.param == "sparsify":  # no W_enc of ours: its reads take the full backward through its encoder
        coders[1] = sparsify_coder(transcoder=True, seed=1)
    adapters = [TranscoderFeatures(s, hook_in=hook_in, hook_out=hook) if hook_in != hook else SAEFeatures(s)
                for s, (_, _, hook_in, hook, _) in zip(coders, PLACES)]
    saes = [a.sae for a in adapters]  # sparsify's coder wrapped: dense encode, decode and W_dec
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(2, D_VOCAB, (N, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(2, D_VOCAB, (N, 2), generator=g)
    metric = metrics.logit_diff([7, 3, 11], [9, 4, 12])
    keep = {a.name: kept for a, (*_, kept) in zip(adapters, PLACES)}
    return model, saes, adapters, keep, clean, corrupt, metric


def node_writes(sae, place: str, layer: int, kept: list[int], u: torch.Tensor, a: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Each node's write, by ``feature_reference``'s definition."""
    return ref.Dict(place, layer, sae, "", "", kept).nodes(u, a)


def writes(model, saes, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every sender's write: the embedding, layer 1's heads (z @ W_O), each dictionary's nodes."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        out = {"embed": cache["blocks.0.hook_resid_pre"]}
        for h in range(4):
            out[f"L1.H{h}"] = cache["blocks.1.attn.hook_z"][:, :, h] @ model.blocks[1].attn.W_O[h]
        for sae, (place, layer, hook_in, hook, kept) in zip(saes, PLACES):
            out |= node_writes(sae, place, layer, kept, cache[hook_in], cache[hook])
    return out


def patched_metric(model, saes, tokens, receiver: str, d: torch.Tensor, metric) -> torch.Tensor:
    """The metric with ``d`` added to what ``receiver`` (a dictionary node at an MLP, or the logits) reads."""
    if receiver == "logits":
        return metric(model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x + d)]),
                      torch.arange(len(tokens)))
    i = next(i for i, p in enumerate(PLACES) if receiver.startswith(f"{p[0]}{p[1]}."))
    place, layer, hook_in, hook, kept = PLACES[i]
    block, seen, busy = model.blocks[layer], {}, [False]

    def grab(x, hook):
        seen[(hook.name, busy[0])] = x
        return x

    def swap(a, hook):
        if busy[0]:
            return a
        busy[0] = True
        try:
            a2 = block.mlp(block.ln2(seen[f"blocks.{layer}.hook_resid_mid", False] + d))
        finally:
            busy[0] = False
        u, u2 = (a, a2) if hook_in == hook.name else (seen[hook_in, False], seen[hook_in, True])
        new = node_writes(saes[i], place, layer, kept, u2, a2)[receiver]
        return a + new - node_writes(saes[i], place, layer, kept, u, a)[receiver]
    hooks = [(f"blocks.{layer}.hook_resid_mid", grab), (hook, swap)] + ([(hook_in, grab)] if hook_in != hook else [])
    return metric(model.run_with_hooks(tokens, fwd_hooks=hooks), torch.arange(len(tokens)))


@pytest.mark.parametrize("method", ["atp", "ap"])
def test_edges_into_features_and_logits_equal_the_bridges_own_patching(setup, method: str) -> None:
    model, saes, adapters, keep, clean, corrupt, metric = setup
    result = attribute_edges(model, clean, corrupt, metric, method=method, features=adapters, keep=keep)
    w_clean, w_noise = writes(model, saes, clean), writes(model, saes, corrupt)
    with torch.no_grad():
        base = metric(model(clean), torch.arange(N))
    checked = 0
    for e, name in enumerate(result.graph.names):
        s, r = name.split(" -> ")
        if r.startswith("L"):
            continue  # into heads: the TransformerLens 3 tests patch those through per-head input hooks
        d = w_noise[s] - w_clean[s]
        if method == "atp":
            eps = torch.zeros(N, 1, 1, dtype=torch.float64, requires_grad=True)
            (i,) = torch.autograd.grad(patched_metric(model, saes, clean, r, eps * d, metric).sum(), eps)
            i = i.flatten()
        else:
            with torch.no_grad():
                i = patched_metric(model, saes, clean, r, d, metric) - base
        tol = 1e-9 * max(1.0, float(i.abs().max()))
        assert abs(float(result.signed[e]) - float(i.mean())) <= tol, name
        want = float(i.abs().mean()) if method == "atp" else abs(float(i.mean()))
        assert abs(float(result.scores[e]) - want) <= tol, name
        checked += 1
    # into mlp0's 4 nodes from 6 senders, into mlp1's 5 from 14, into the logits from all 19
    assert checked == 4 * 6 + 5 * 14 + 19


def test_node_atp_is_the_sum_of_outgoing_edges_and_the_graph_is_complete(setup) -> None:
    model, saes, adapters, keep, clean, corrupt, metric = setup
    result = attribute_edges(model, clean, corrupt, metric, method="atp", features=adapters, keep=keep)
    nodes = attribute(model, clean, corrupt, metric, nodes=adapters, method="atp")
    frame = result.to_frame()
    for adapter, (place, layer, _, _, kept) in zip(adapters, PLACES):
        want = {f"{place}{layer}.f{i}": float(nodes.signed[adapter.name][:, i].sum()) for i in kept}
        want[f"{place}{layer}.error"] = float(nodes.signed[adapter.name + ".error"].sum())
        for sender, value in want.items():
            assert abs(frame.loc[frame.sender == sender, "signed"].sum() - value) <= 1e-9 * max(1.0, abs(value))
    clean_m, corrupt_m, (everything,) = result.context.circuit_metrics(
        [torch.ones(result.graph.n_edges, dtype=torch.bool)])
    assert abs(everything - corrupt_m) <= 1e-10 * abs(clean_m - corrupt_m)

"""method="atp" edge scores equal TransformerLens 4.3's own edge EAP
(``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))``) on the same TransformerBridge,
up to its convention: TransformerLens takes the gradient on the corrupt run and the change clean -
corrupt (denoising), so its scores are ours with the roles of the two prompts swapped."""

from __future__ import annotations

import pytest
import torch

attribution_patching = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
try:
    attribution_patching.EdgeAttributionConfig(granularity="edge")
except NotImplementedError as e:  # TransformerLens 3.9 ships the module with node granularity only
    pytest.skip(f"this TransformerLens has no edge attribution patching ({e})", allow_module_level=True)
from atp_plugin import metrics  # noqa: E402
from atp_plugin.edges import attribute_edges  # noqa: E402
from hf_models import D_VOCAB, load_bridge, save_gpt2  # noqa: E402


def our_name(node) -> str:
    kind, layer, head = node.kind, node.layer, node.head
    return {"embed": "embed", "attn_head_out": f"L{layer}.H{head}", "mlp_out": f"mlp{layer}",
            "q_input": f"L{layer}.H{head}.q", "k_input": f"L{layer}.H{head}.k", "v_input": f"L{layer}.H{head}.v",
            "mlp_in": f"mlp{layer}", "logits": "logits"}[kind]


def test_atp_equals_transformer_lens_edge_eap(tmp_path):
    bridge = load_bridge(save_gpt2(tmp_path / "gpt2"))
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, D_VOCAB, (3, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(2, D_VOCAB, (3,), generator=g)
    answer, wrong = 7, 9
    theirs = attribution_patching.attribution_patch(
        bridge, clean, corrupt, lambda logits: logits[0, -1, answer] - logits[0, -1, wrong],
        attribution_patching.EdgeAttributionConfig(granularity="edge")).edge_scores
    ours = attribute_edges(bridge, corrupt, clean, metrics.logit_diff([answer] * 3, [wrong] * 3), per_position=True)
    assert len(theirs) == ours.signed.numel()  # the same graph: every edge at every position
    got = torch.tensor([float(ours.signed[ours.graph.edge_of[f"{our_name(w)} -> {our_name(r)}"], w.position])
                        for w, r in theirs], dtype=torch.float64)
    want = torch.tensor(list(theirs.values()), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    assert float(want.abs().max()) > 1e-2

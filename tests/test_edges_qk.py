"""atp+qk for edges into queries and keys against a naive per-edge recomputation of the attention
pattern by real forward passes (tests/edge_reference.qk_fixed); every other edge keeps its EAP score."""

from __future__ import annotations

import pytest

from conftest import HAS_HOOKED, MISSING

if not HAS_HOOKED:
    pytest.skip(MISSING["hooked"], allow_module_level=True)

import torch

import edge_reference as ref
from atp_plugin.edges import attribute_edges
from conftest import VARIANTS, logit_diff_metric, make_model, make_pairs

N, T = 2, 4


@pytest.mark.parametrize("variant", ["ln_gelu", "rms_rotary_gated", "gqa", "softcap", "parallel"])
def test_qk_edges_match_naive_recomputation(variant):
    model = make_model(0, **{**VARIANTS[variant], "n_layers": 2})
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    names, per_pair = ref.qk_fixed(model, clean, corrupt, metric)
    fixed = attribute_edges(model, clean, corrupt, metric, method="atp+qk", per_position=True)
    plain = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=True)
    order = [fixed.graph.edge_of[n] for n in names]
    torch.testing.assert_close(fixed.signed[order], per_pair.mean(0), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fixed.scores[order], per_pair.abs().mean(0), rtol=1e-9, atol=1e-11)
    others = torch.ones(fixed.graph.n_edges, dtype=torch.bool)
    others[order] = False
    torch.testing.assert_close(fixed.signed[others], plain.signed[others], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(fixed.signed[order], plain.signed[order], rtol=1e-3)  # the fix changes something


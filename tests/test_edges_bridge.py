"""Edges on a TransformerBridge in compatibility mode: the same numbers as HookedTransformer on the
same weights (a random GPT-2 saved as a Hugging Face checkpoint and loaded both ways, float64)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")
from atp_plugin.edges import attribute_edges  # noqa: E402
from hf_models import load_bridge, load_hooked, save_gpt2  # noqa: E402
from test_bridge import pairs  # noqa: E402

TOL = dict(rtol=1e-7, atol=1e-9)  # the Bridge processes weights at float32-level precision


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

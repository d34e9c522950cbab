"""Score shapes of the built-in node types (docs/method.md, "Nodes and score shapes") and the result's
tables and views, on HookedTransformers (TransformerLens 3) and on a GPT-2 and a Llama (grouped-query
attention) as TransformerBridges (both)."""

from __future__ import annotations

import warnings

import pytest
import torch

from atp_plugin import attribute
from conftest import VARIANTS, logit_diff_metric, make_bridge, make_model, make_pairs, needs_hooked

N, T = 2, 5
NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons", "resid_pre"]


def expected_shapes(cfg) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """node type -> (dims, score shape), from the model config (docs/method.md, "Nodes and score shapes")."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    head = ("layer", "pos", "head")
    return {
        "attn_q": (head, (cfg.n_layers, T, cfg.n_heads)),
        "attn_k": (head, (cfg.n_layers, T, n_kv)),
        "attn_v": (head, (cfg.n_layers, T, n_kv)),
        "attn_z": (head, (cfg.n_layers, T, cfg.n_heads)),
        "mlp_neurons": (("layer", "pos", "neuron"), (cfg.n_layers, T, cfg.d_mlp)),
        "resid_pre": (("layer", "pos"), (cfg.n_layers, T)),
    }


def hooked(*variants: str) -> list:
    """HookedTransformer variants as parameters skipped where TransformerLens 4 lacks them."""
    return [pytest.param(v, marks=needs_hooked) for v in variants]


def result_for(variant: str, method: str):
    """``"bridge"``: a 2-layer GPT-2 TransformerBridge, ``"bridge_llama"``: a Llama one; else ``make_model``'s."""
    model = (make_bridge() if variant == "bridge" else make_bridge(llama=True) if variant == "bridge_llama"
             else make_model(**VARIANTS[variant]))
    clean, corrupt = make_pairs(N, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, attribute(model, clean, corrupt, logit_diff_metric(N), nodes=NODES, method=method)


@pytest.mark.parametrize("method", ["atp", "atp*"])
@pytest.mark.parametrize("variant", [*hooked("ln_gelu", "rms_rotary_gated", "gqa"), "bridge", "bridge_llama"])
def test_score_shapes(variant: str, method: str) -> None:
    model, result = result_for(variant, method)
    if variant in ("gqa", "bridge_llama"):
        assert model.cfg.n_key_value_heads < model.cfg.n_heads  # the case the k/v shapes are about
    expected = expected_shapes(model.cfg)
    assert set(result.scores) == set(result.signed) == set(NODES)
    for nt, (dims, shape) in expected.items():
        assert result.dims[nt] == dims, nt
        assert tuple(result.scores[nt].shape) == shape, nt
        assert tuple(result.signed[nt].shape) == shape, nt
        assert result.scores[nt].dtype == torch.float64, nt
        assert (result.scores[nt] >= 0).all(), nt
    assert result.view == "per position"
    assert result.n_pairs == N


@pytest.mark.parametrize("variant", [*hooked("gqa"), "bridge_llama"])
def test_frame_has_one_row_per_node(variant: str) -> None:
    model, result = result_for(variant, "atp+qk")
    frame = result.to_frame()
    assert len(frame) == sum(s.numel() for s in result.scores.values())
    for column in ("node_type", "layer", "pos", "head", "neuron", "score", "signed", "pairs"):
        assert column in frame.columns, column
    assert frame.attrs["view"] == "per position"
    assert frame.attrs["alignment"] == result.alignment
    for nt, score in result.scores.items():
        rows = frame[frame["node_type"] == nt]
        assert len(rows) == score.numel(), nt
        index = tuple(torch.tensor(rows[d].to_numpy(dtype="int64")) for d in result.dims[nt])
        # each row's coordinates point at its own score and signed value
        torch.testing.assert_close(torch.tensor(rows["score"].to_numpy()), score[index], rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(rows["signed"].to_numpy()), result.signed[nt][index], rtol=0, atol=0)
        assert not rows.duplicated(list(result.dims[nt])).any(), nt
        unused = {"head", "neuron"} - set(result.dims[nt])
        assert all(rows[c].isna().all() for c in unused), nt


@pytest.mark.parametrize("variant", [*hooked("ln_gelu"), "bridge"])
def test_top_k(variant: str) -> None:
    _, result = result_for(variant, "atp*")
    top = result.top(7)
    assert len(top) == 7
    everything = torch.cat([s.reshape(-1) for s in result.scores.values()])
    expected = everything.topk(7).values
    torch.testing.assert_close(torch.tensor(top["score"].to_numpy()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", [*hooked("rms_rotary_gated"), "bridge_llama"])
def test_sum_over_positions_is_labelled(variant: str) -> None:
    _, result = result_for(variant, "atp")
    summed = result.sum_over_positions()
    assert summed.view == "summed over positions"
    assert result.view == "per position"  # the original is untouched
    for nt in NODES:
        pos = result.dims[nt].index("pos")
        assert summed.dims[nt] == tuple(d for d in result.dims[nt] if d != "pos")
        torch.testing.assert_close(summed.scores[nt], result.scores[nt].sum(pos), rtol=1e-15, atol=0)
        torch.testing.assert_close(summed.signed[nt], result.signed[nt].sum(pos), rtol=1e-15, atol=0)
    frame = summed.to_frame()
    assert frame.attrs["view"] == "summed over positions"
    assert "pos" not in frame.columns
    assert len(frame) == sum(s.numel() for s in summed.scores.values())


@pytest.mark.parametrize("variant", [*hooked("ln_gelu"), "bridge"])
def test_repr_names_the_method_view_and_shapes(variant: str) -> None:
    _, result = result_for(variant, "atp")
    text = repr(result)
    assert text.startswith("AttributionResult(method='atp', ") and "per position" in text
    for nt in NODES:
        shape = ", ".join(f"{d}={n}" for d, n in zip(result.dims[nt], result.scores[nt].shape))
        assert f"  {nt}: [{shape}]" in text
    assert ".verify(k)" in text and ".verify(k)" not in repr(result.sum_over_positions())
    assert "summed over positions" in repr(result.sum_over_positions())

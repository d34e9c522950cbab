"""AtP, the QK fix and GradDrop against naive references written here (docs/method.md, sections 2-4).

The references use only TransformerLens hooks and ``torch.autograd``: a cache of the corrupt
run, one clean forward + backward for dL/d(site), one REAL forward pass per query/key node with
only that (pre-rotary) vector patched to read the new attention pattern, and, for GradDrop, one
forward + backward per layer with that layer's attention and MLP outputs detached. Nothing from
``atp_plugin.engine`` is used to compute expected values.

The model variants of ``conftest.VARIANTS`` are HookedTransformers (TransformerLens 3); a random
3-layer GPT-2 as a TransformerBridge (``"bridge"``) runs under TransformerLens 3 and 4. (A Llama on
the Bridge cannot be held to these tolerances: Hugging Face's Llama attention takes its softmax in
float32, so the model's own patterns are 6e-8 off a float64 softmax of its scores.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

from atp_plugin import attribute, metrics
from atp_plugin.engine.estimates import BLOCKED_FROM, ROW_BLOCKS
from conftest import VARIANTS, logit_diff_metric, make_bridge, make_model, make_pairs, needs_hooked
from helpers import (
    ATP_METHODS,
    QK_NODES,
    assert_matches,
    check_against_reference,
    node_types,
    reference,
    string_pairs,
    tokenized_model,
    words_model,
)


def model_of(variant: str):
    """``make_model`` of the variant, or for ``"bridge"`` a random 3-layer GPT-2 TransformerBridge."""
    return make_bridge(0, 3) if variant == "bridge" else make_model(**VARIANTS[variant])


def hooked(*variants: str) -> list:
    """The HookedTransformer variants as parameters skipped where TransformerLens 4 lacks them."""
    return [pytest.param(v, marks=needs_hooked) for v in variants]


@pytest.mark.parametrize("variant", [*hooked(*sorted(VARIANTS)), "bridge"])
def test_reference_every_variant(variant: str) -> None:
    """Every node type and every AtP method on every model variant of conftest.VARIANTS, and the Bridge."""
    model = model_of(variant)
    clean, corrupt = make_pairs(3, 6)
    check_against_reference(model, clean, corrupt, logit_diff_metric(3))


@pytest.mark.parametrize("variant", [*hooked("ln_gelu", "gqa"), "bridge"])
def test_reference_across_batches(variant: str) -> None:
    """Pairs split over several batches (2 + 2 + 1): every batch adds its pairs to the means."""
    model = model_of(variant)
    clean, corrupt = make_pairs(5, 6, seed=4)
    check_against_reference(model, clean, corrupt, logit_diff_metric(5), batch_size=2)


@pytest.mark.parametrize("variant", [*hooked("gqa"), "bridge"])
def test_reference_in_row_blocks(variant: str) -> None:
    """From BLOCKED_FROM tokens on, the QK fix runs in blocks of query rows, each on the keys its
    rows see (uneven blocks here: 37 rows in blocks of 5), and GradDrop keeps it factored per block."""
    n_tokens = BLOCKED_FROM + 5
    assert n_tokens % ROW_BLOCKS != 0
    model = (make_bridge(0, 3, n_positions=n_tokens, n_ctx=n_tokens) if variant == "bridge"
             else make_model(**VARIANTS[variant], n_ctx=n_tokens))
    clean, corrupt = make_pairs(2, n_tokens, seed=6)
    check_against_reference(model, clean, corrupt, logit_diff_metric(2))


@needs_hooked
def test_reference_ungrouped_gqa() -> None:
    """TransformerLens's ungroup_grouped_query_attention gives hook_k/hook_v a copy per query head:
    nodes and the QK fix follow the hook (n_heads keys and values), not the config's kv-heads."""
    model = make_model(**VARIANTS["gqa"], ungroup_grouped_query_attention=True)
    clean, corrupt = make_pairs(3, 6)
    result = attribute(model, clean, corrupt, logit_diff_metric(3), nodes=["attn_k", "attn_v"], method="atp+qk")
    assert result.scores["attn_k"].shape == result.scores["attn_v"].shape == (3, 6, model.cfg.n_heads)
    check_against_reference(model, clean, corrupt, logit_diff_metric(3))


@needs_hooked
def test_reference_nonlinear_metric() -> None:
    """log P(answer) is not linear in the logits: the gradient still has to be exact."""
    model = make_model(**VARIANTS["gqa"])
    clean, corrupt = make_pairs(3, 6, seed=5)
    check_against_reference(model, clean, corrupt, metrics.log_prob(torch.tensor([3, 17, 41])))


@pytest.mark.parametrize("variant", [*hooked("ln_gelu"), "bridge"])
def test_qk_fix_differs_from_atp(variant: str) -> None:
    """The models are saturated enough that the QK fix changes q/k estimates (else the reference
    comparisons above could not tell the two apart)."""
    model = model_of(variant)
    clean, corrupt = make_pairs(3, 6)
    expected = reference(model, clean, corrupt, logit_diff_metric(3))
    for nt in QK_NODES:
        diff = (expected["atp"][1][nt] - expected["atp+qk"][1][nt]).abs().max()
        assert diff > 1e-3 * expected["atp+qk"][1][nt].abs().max(), nt
    diff = (expected["atp+gd"][0]["attn_z"] - expected["atp"][0]["attn_z"]).abs().max()
    assert diff > 1e-3 * expected["atp"][0]["attn_z"].abs().max()


# --- padded batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*hooked("ln_gelu", "gqa", "softcap"), "bridge"])
def test_padded_batch_equals_pairs_alone(variant: str) -> None:
    """Left-padded pairs of different lengths: each pair contributes exactly what the naive
    reference gives for it alone, unpadded (positions aligned on the last token); a position is
    averaged over the pairs in which it is real (pad positions have no nodes)."""
    model = words_model("bridge") if variant == "bridge" else tokenized_model(variant)
    lengths = [4, 6, 3, 5, 2]  # in batches of 2: the longest pair is in the first batch only
    clean, corrupt = string_pairs(lengths, n_words=48 if variant == "bridge" else 49)
    answers, wrongs = torch.tensor([5, 9, 30, 1, 44]), torch.tensor([7, 2, 11, 40, 3])
    width = max(lengths)
    types = node_types(model)
    alone = [reference(model, model.to_tokens(c, prepend_bos=False), model.to_tokens(n, prepend_bos=False),
                       metrics.logit_diff(answers[i:i + 1], wrongs[i:i + 1]))
             for i, (c, n) in enumerate(zip(clean, corrupt))]
    count = torch.zeros(width, dtype=torch.float64)
    for n in lengths:
        count[width - n:] += 1
    for method in ATP_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            padded = attribute(model, clean, corrupt, metrics.logit_diff(answers, wrongs), nodes=types, method=method,
                               batch_size=2)
        assert padded.alignment.startswith("left-padded")
        assert padded.pair_counts.tolist() == count.tolist()  # the longest pair is real at every position
        for nt in types:
            for kind, got in (("scores", padded.scores[nt]), ("signed", padded.signed[nt])):
                if kind == "signed" and method in ("atp+gd", "atp*"):
                    continue
                total = torch.zeros_like(got)
                for ref, n in zip(alone, lengths):
                    total[:, width - n:] += ref[method][0 if kind == "scores" else 1][nt]
                expected = total / count.reshape((1, width) + (1,) * (got.ndim - 2))
                assert_matches(got, expected, f"{method} padded {kind} of {nt}")

"""Exact identities between the methods (docs/method.md), and ``ap`` against TransformerLens's own
activation patching (``transformer_lens.patching``).

- A one-layer attention-only model without normalization, with a logit-difference metric, is
  linear in every value vector, head output and attention-pattern entry: AtP is exact for
  ``attn_v``/``attn_z``, and the QK fix (exact softmax, linear after it) is exact for
  ``attn_q``/``attn_k``.
- GradDrop: a node inside the last layer has I_l = Iatp for l < L-1 and I_{L-1} = 0, so with the
  1/(L-1) normalisation c_gd = |I| per pair: ``atp*`` equals ``atp+qk`` and ``atp+gd`` equals
  ``atp`` there. With L = 1 GradDrop is undefined and the methods equal their variants without it.

The one-layer models without normalization are HookedTransformers (TransformerLens 3); the GradDrop
identity and ``ap`` against ``transformer_lens.patching`` also run on a GPT-2 and a Llama as
TransformerBridges (TransformerLens 3 and 4).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import pytest
import torch
from transformer_lens import patching

from atp_plugin import attribute
from conftest import VARIANTS, logit_diff_metric, make_bridge, make_model, make_pairs, needs_hooked, needs_hooked_for

ATTN = ["attn_q", "attn_k", "attn_v", "attn_z"]
ONE_LAYER = {
    "plain": dict(n_layers=1, attn_only=True, normalization_type=None),
    "rotary_gqa": dict(n_layers=1, attn_only=True, normalization_type=None, positional_embedding_type="rotary",
                       rotary_dim=8, n_key_value_heads=2),
    "softcap": dict(n_layers=1, attn_only=True, normalization_type=None, attn_scores_soft_cap=5.0),
}


needs_linear = needs_hooked_for("a one-layer attention-only model without LayerNorm (make_model)")


def hooked(*variants: str) -> list:
    """HookedTransformer variants as parameters skipped where TransformerLens 4 lacks them."""
    return [pytest.param(v, marks=needs_hooked) for v in variants]


def model_of(variant: str, **overrides):
    """``"bridge"``: a random GPT-2 TransformerBridge (3 layers, or ``n_layers``), ``"bridge_llama"``:
    a 2-layer Llama one (2 kv-heads); else ``make_model`` of the variant with ``overrides``."""
    if variant == "bridge":
        return make_bridge(0, overrides.get("n_layers", 3))
    if variant == "bridge_llama":
        return make_bridge(llama=True)
    return make_model(**(VARIANTS[variant] | overrides))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the expected values are all zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12 * scale, msg=lambda m: f"{what}: {m}")


def run(model, clean, corrupt, metric, nodes, method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(model, clean, corrupt, metric, nodes=nodes, method=method, batch_size=2,
                         patch_batch_size=5)  # 3 pairs in 2 batches: every batch adds to the means


@needs_linear
@pytest.mark.parametrize("kind", sorted(ONE_LAYER))
def test_first_order_is_exact_on_linear_model(kind: str) -> None:
    model = make_model(**ONE_LAYER[kind])
    clean, corrupt = make_pairs(3, 6)
    metric = logit_diff_metric(3)
    ap = run(model, clean, corrupt, metric, ATTN, "ap")
    atp = run(model, clean, corrupt, metric, ATTN, "atp")
    qk = run(model, clean, corrupt, metric, ATTN, "atp+qk")
    for nt in ("attn_v", "attn_z"):
        close(atp.signed[nt], ap.signed[nt], f"atp == ap for {nt}")
        close(qk.signed[nt], ap.signed[nt], f"atp+qk == ap for {nt}")
    for nt in ("attn_q", "attn_k"):
        close(qk.signed[nt], ap.signed[nt], f"atp+qk == ap for {nt}")
        # the softmax is not linear: plain AtP must be off, or this test proves nothing about the fix
        gap = (atp.signed[nt] - ap.signed[nt]).abs().max()
        assert gap > 1e-3 * ap.signed[nt].abs().max(), f"AtP is already exact for {nt}; saturate the model more"
    for nt in ATTN:
        close(ap.scores[nt], ap.signed[nt].abs(), f"ap score == |mean I| for {nt}", rtol=1e-15)


@needs_linear
@pytest.mark.parametrize("kind", sorted(ONE_LAYER))
def test_first_order_is_exact_per_pair(kind: str) -> None:
    """With one pair the scores (magnitudes) agree too."""
    model = make_model(**ONE_LAYER[kind])
    clean, corrupt = make_pairs(1, 7, seed=4)
    metric = logit_diff_metric(1)
    ap = run(model, clean, corrupt, metric, ATTN, "ap")
    qk = run(model, clean, corrupt, metric, ATTN, "atp+qk")
    for nt in ATTN:
        close(qk.scores[nt], ap.scores[nt], f"atp+qk == ap scores for {nt}")


def test_graddrop_undefined_for_one_layer(host: str) -> None:
    model = make_model(**ONE_LAYER["plain"]) if host == "hooked" else make_bridge(0, 1)
    clean, corrupt = make_pairs(3, 6)
    metric = logit_diff_metric(3)
    for gd, base in (("atp*", "atp+qk"), ("atp+gd", "atp")):
        with pytest.warns(UserWarning, match="GradDrop is undefined for a one-layer model"):
            with_gd = attribute(model, clean, corrupt, metric, nodes=ATTN, method=gd)
        without = run(model, clean, corrupt, metric, ATTN, base)
        for nt in ATTN:
            close(with_gd.scores[nt], without.scores[nt], f"{gd} == {base} on one layer for {nt}", rtol=1e-15)


@pytest.mark.parametrize("variant", [*hooked("ln_gelu", "gqa", "parallel", "attn_only"), "bridge"])
def test_graddrop_last_layer_equals_first_order(variant: str) -> None:
    """c_gd = |I| per pair for nodes inside the last layer (1/(L-1) normalisation)."""
    model = model_of(variant)
    clean, corrupt = make_pairs(3, 6)
    metric = logit_diff_metric(3)
    nodes = ATTN + ([] if model.cfg.attn_only else ["mlp_neurons"])
    last = model.cfg.n_layers - 1
    with pytest.warns(UserWarning, match="GradDrop degenerates with few layers"):
        star = attribute(model, clean, corrupt, metric, nodes=nodes, method="atp*")
    results = {m: run(model, clean, corrupt, metric, nodes, m) for m in ("atp+gd", "atp+qk", "atp")}
    for nt in nodes:
        close(star.scores[nt][last], results["atp+qk"].scores[nt][last], f"atp* == atp+qk, last layer, {nt}")
        close(results["atp+gd"].scores[nt][last], results["atp"].scores[nt][last], f"atp+gd == atp, last layer, {nt}")
    # and not below it: GradDrop must actually change earlier layers' scores
    gap = (star.scores["attn_z"][:last] - results["atp+qk"].scores["attn_z"][:last]).abs().max()
    assert gap > 1e-3 * results["atp+qk"].scores["attn_z"].abs().max()


# --- ap against transformer_lens.patching ----------------------------------------------------------

@contextmanager
def float64_default() -> Iterator[None]:
    """transformer_lens.patching stores its results in torch.zeros(...) of the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def neuron_setter(corrupted_activation: torch.Tensor, index, clean_activation: torch.Tensor) -> torch.Tensor:
    """Patch one neuron at one position (``index`` = layer, pos, neuron)."""
    _, pos, neuron = index
    corrupted_activation[:, pos, neuron] = clean_activation[:, pos, neuron]
    return corrupted_activation


TL_PATCHERS = {
    "attn_q": patching.get_act_patch_attn_head_q_by_pos,
    "attn_k": patching.get_act_patch_attn_head_k_by_pos,
    "attn_v": patching.get_act_patch_attn_head_v_by_pos,
    "attn_z": patching.get_act_patch_attn_head_out_by_pos,
    "resid_pre": patching.get_act_patch_resid_pre,
}


@pytest.mark.parametrize("variant, nodes", [
    pytest.param("ln_gelu", sorted(TL_PATCHERS) + ["mlp_neurons"], marks=needs_hooked),
    pytest.param("gqa", ["attn_k", "attn_v"], marks=needs_hooked),  # k/v: n_kv heads
    ("bridge", sorted(TL_PATCHERS) + ["mlp_neurons"]),
    ("bridge_llama", ["attn_k", "attn_v"]),
])
def test_ap_equals_transformer_lens_patching(variant: str, nodes: list[str]) -> None:
    """transformer_lens.patching runs its first argument's tokens with the cache's values patched in
    and applies the metric to the patched logits: run it on the clean tokens with the corrupt cache;
    its mean over pairs minus the clean mean is our signed ``ap``."""
    model = model_of(variant, n_layers=2)
    n, t = 3, 5
    clean, corrupt = make_pairs(n, t)
    metric = logit_diff_metric(n)
    pairs = torch.arange(n)
    ours = run(model, clean, corrupt, metric, nodes, "ap")
    with float64_default(), torch.no_grad():
        base = metric(model(clean), pairs).mean()
        _, corrupt_cache = model.run_with_cache(corrupt)

        def tl_metric(logits: torch.Tensor) -> torch.Tensor:
            return metric(logits, pairs).mean()

        theirs = {nt: TL_PATCHERS[nt](model, clean, corrupt_cache, tl_metric) for nt in nodes if nt in TL_PATCHERS}
        if "mlp_neurons" in nodes:  # no built-in neuron patcher: 16 random (layer, pos, neuron)
            g = torch.Generator().manual_seed(0)
            picks = [torch.randint(0, hi, (16,), generator=g) for hi in (model.cfg.n_layers, t, model.cfg.d_mlp)]
            index = pd.DataFrame({c: p.numpy() for c, p in zip(("layer", "pos", "neuron"), picks)})
            tl_neurons = patching.generic_activation_patch(model, clean, corrupt_cache, tl_metric, neuron_setter,
                                                           "post", index_df=index)
            theirs["mlp_neurons"] = (tl_neurons, ours.signed["mlp_neurons"][tuple(picks)])
    for nt in nodes:
        tl, mine = theirs[nt] if nt == "mlp_neurons" else (theirs[nt], ours.signed[nt])
        assert tl.dtype == torch.float64 and mine.shape == tl.shape, nt
        close(mine, tl - base, f"ap == transformer_lens.patching for {nt}")

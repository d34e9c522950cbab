"""Transcoder features (``atp_plugin.adapters.TranscoderFeatures``) against independent computations.

- ``ap`` equals a hand-written patch: hooks that add ``(f_i' - f_i) W_dec[i]`` (or ``e' - e``) at
  the output hook at one position, with features and errors computed here from cached activations.
- Where the metric is linear in the output hook (last layer's ``hook_mlp_out``, no normalisation,
  logit difference), AtP is exact: ``atp == ap``.
- GradDrop places the nodes in their output hook's layer: closed forms for ``atp+gd``.
- A ``HookedSAETransformer`` with the transcoders spliced in gives the numbers of the plain model.
- Every backend, ``verify`` and ``false_negative_bound`` run on transcoder nodes, with exact numbers.
- Transcoders that do not fit the model are clear errors.

Transcoders are SAE-Lens classes with random float64 weights (no downloads).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from atp_plugin import attribute, false_negative_bound
from atp_plugin.adapters import SAEFeatures, TranscoderFeatures
from conftest import clean_gradients, logit_diff_metric, make_model, make_pairs
from helpers import D_SAE, SAE_N, SAE_T, TRANSCODER_ARCHS, close, make_sae, make_transcoder, run_attribution, spliced

N, T = SAE_N, SAE_T


def name_of(tc) -> str:
    return f"transcoder:{tc.cfg.metadata.hook_name}->{tc.cfg.metadata.hook_name_out}"


# --- exact patching against a hand-written patch ----------------------------------------------
@pytest.mark.parametrize("arch", sorted(TRANSCODER_ARCHS))
def test_ap_equals_a_hand_written_patch_at_the_output_hook(arch: str) -> None:
    """Layer 0's MLP replaced in a 2-layer LayerNorm model: every feature and error node at every
    position, patched by adding its change at ``hook_mlp_out`` (the effect runs through layer 1)."""
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = make_transcoder(arch, hook_in, hook_out)
    model = make_model(n_layers=2)
    res = run_attribution(model, [TranscoderFeatures(tc)], "ap")

    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    with torch.no_grad():
        _, c = model.run_with_cache(clean, names_filter=[hook_in, hook_out])
        _, n = model.run_with_cache(corrupt, names_filter=[hook_in, hook_out])
        f, f_noise = tc.encode(c[hook_in]), tc.encode(n[hook_in])         # [N, T, d_sae]
        err = c[hook_out] - (f @ tc.W_dec + tc.b_dec)                     # [N, T, d_out]
        err_noise = n[hook_out] - (f_noise @ tc.W_dec + tc.b_dec)
        base = metric(model(clean), torch.arange(N))
        t_of = torch.arange(T).repeat_interleave(D_SAE)  # copy k patches feature i_of[k] at t_of[k]
        i_of = torch.arange(D_SAE).repeat(T)
        features, errors = torch.zeros(N, T, D_SAE, dtype=torch.float64), torch.zeros(N, T, dtype=torch.float64)
        for p in range(N):
            add = torch.zeros(T * D_SAE, T, tc.cfg.d_out, dtype=torch.float64)   # [copies, T, d_out]
            add[torch.arange(T * D_SAE), t_of] = (f_noise[p, t_of, i_of] - f[p, t_of, i_of])[:, None] * tc.W_dec[i_of]
            logits = model.run_with_hooks(clean[p].expand(T * D_SAE, T),
                                          fwd_hooks=[(hook_out, lambda a, hook, add=add: a + add)])
            features[p] = (metric(logits, torch.full((T * D_SAE,), p)) - base[p]).reshape(T, D_SAE)
            add = torch.zeros(T, T, tc.cfg.d_out, dtype=torch.float64)
            add[torch.arange(T), torch.arange(T)] = err_noise[p] - err[p]
            logits = model.run_with_hooks(clean[p].expand(T, T),
                                          fwd_hooks=[(hook_out, lambda a, hook, add=add: a + add)])
            errors[p] = metric(logits, torch.full((T,), p)) - base[p]
    name = name_of(tc)
    assert set(res.signed) == {name, name + ".error"}
    assert res.signed[name].shape == (T, D_SAE) and res.signed[name + ".error"].shape == (T,)
    close(res.signed[name], features.mean(0), f"{arch}: feature patch vs adding delta * W_dec[i]")
    close(res.signed[name + ".error"], errors.mean(0), f"{arch}: error patch vs adding e' - e")
    assert (features.mean(0) != 0).sum() >= 3 * T, "hardly any feature changes: the test proves little"


# --- first order is exact where the metric is linear in the output hook --------------------------
@pytest.mark.parametrize("arch", sorted(TRANSCODER_ARCHS))
def test_atp_is_exact_where_the_metric_is_linear_in_the_output_hook(arch: str) -> None:
    """Last layer's MLP, no normalisation: the logit difference is linear in ``hook_mlp_out``, and a
    feature's patch leaves the input (``hook_resid_mid``) unchanged."""
    tc = make_transcoder(arch, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    model = make_model(n_layers=2, normalization_type=None)
    atp = run_attribution(model, [TranscoderFeatures(tc)], "atp")
    ap = run_attribution(model, [TranscoderFeatures(tc)], "ap")
    name = name_of(tc)
    close(atp.signed[name], ap.signed[name], f"{arch}: atp == ap for features")
    close(atp.signed[name + ".error"], ap.signed[name + ".error"], f"{arch}: atp == ap for the error node")
    assert (ap.signed[name][-1] != 0).sum() >= 3, "hardly any feature changes at the last position"


# --- GradDrop: the nodes belong to their output hook's layer ----------------------------------
def test_graddrop_places_the_nodes_in_the_output_hooks_layer() -> None:
    """2 layers, no normalisation. Last layer: I_0 = Iatp, I_1 = 0, so atp+gd == atp. Layer 0:
    I_0 = 0 and I_1 uses the gradient with layer 1's writes cut, i.e. the direct path: dL/d a =
    dL/d(final residual), from autograd here."""
    model = make_model(n_layers=2, normalization_type=None)
    last = make_transcoder("jumprelu", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", seed=1)
    first = make_transcoder("skip", "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", seed=2)
    nodes = [TranscoderFeatures(last), TranscoderFeatures(first)]
    gd, atp = run_attribution(model, nodes, "atp+gd"), run_attribution(model, nodes, "atp")
    for key in (name_of(last), name_of(last) + ".error"):
        close(gd.scores[key], atp.scores[key], f"atp+gd == atp for the last layer's {key}")

    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    _, direct = clean_gradients(model, clean, metric, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    hook_in, hook_out = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"
    with torch.no_grad():
        _, c = model.run_with_cache(clean, names_filter=[hook_in, hook_out])
        _, n = model.run_with_cache(corrupt, names_filter=[hook_in, hook_out])
        f, f_noise = first.encode(c[hook_in]), first.encode(n[hook_in])      # [N, T, d_sae]
        err = c[hook_out] - first.decode(f)
        err_noise = n[hook_out] - first.decode(f_noise)
        features = ((f_noise - f) * (direct @ first.W_dec.T)).abs().mean(0)   # [T, d_sae]
        errors = ((err_noise - err) * direct).sum(-1).abs().mean(0)          # [T]
    close(gd.scores[name_of(first)], features, "atp+gd for layer 0's features: direct path only")
    close(gd.scores[name_of(first) + ".error"], errors, "atp+gd for layer 0's error node: direct path only")


# --- spliced and plain models agree -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ways():
    """A 3-layer model with two transcoders and an SAE, plain and with them spliced in."""
    model = make_model(n_layers=3)
    saes = [make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", seed=1),
            make_transcoder("jumprelu_skip", "blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out", seed=2),
            make_sae("standard", "blocks.1.hook_resid_post", seed=3)]
    nodes = [TranscoderFeatures(saes[0]), TranscoderFeatures(saes[1]), SAEFeatures(saes[2]), "attn_z"]
    return model, spliced(model, saes), nodes


@pytest.mark.parametrize("method", ["atp", "atp+qk", "atp*", "ap"])
def test_spliced_and_plain_models_give_the_same_numbers(two_ways, method: str) -> None:
    model, with_saes, nodes = two_ways
    plain, spl = run_attribution(model, nodes, method), run_attribution(with_saes, nodes, method)
    assert set(plain.scores) == set(spl.scores)
    for key in plain.scores:
        close(spl.scores[key], plain.scores[key], f"{method}: scores of {key}")
        if not plain.signed[key].isnan().all():
            close(spl.signed[key], plain.signed[key], f"{method}: signed of {key}")


def test_a_joint_patch_recomputes_features_from_the_patched_input_as_sae_lens_does() -> None:
    """A head upstream of the transcoder's input, a feature and the error node patched jointly (as the
    group backends and the bound do): the other features follow the patched input and the error is
    the current run's, exactly as SAE-Lens's spliced transcoder with ``hook_z``,
    ``hook_sae_acts_post`` and ``hook_sae_error`` patched by hand."""
    from atp_plugin.backends.baselines import joint_effects

    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = make_transcoder("jumprelu_skip", hook_in, hook_out, seed=5)
    model = make_model(n_layers=2)
    res = run_attribution(model, [TranscoderFeatures(tc), "attn_z"], "atp")
    (t, i), t_err, (t_z, h) = (T - 2, 3), T - 1, (1, 2)
    nodes = {(0, ""): torch.tensor([t * D_SAE + i]), (0, ".error"): torch.tensor([t_err]),
             (1, ""): torch.tensor([t_z * model.cfg.n_heads + h])}  # site 1: attn_z of layer 0
    ours = joint_effects(res.engine, nodes, lambda start, stop: torch.ones(stop - start, 3, dtype=torch.bool), 1, "")

    ref = spliced(model, [tc])
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    names = ["blocks.0.attn.hook_z", f"{hook_out}.hook_sae_acts_post", f"{hook_out}.hook_sae_error"]
    with torch.no_grad():
        _, noise = ref.run_with_cache(corrupt, names_filter=names)
        base = metric(ref(clean), torch.arange(N))

        def set_at(key, index):
            def hook(x, hook):
                x = x.clone()
                x[index] = noise[key][index]
                return x
            return hook

        every = slice(None)
        logits = ref.run_with_hooks(clean, fwd_hooks=[(names[0], set_at(names[0], (every, t_z, h))),
                                                      (names[1], set_at(names[1], (every, t, i))),
                                                      (names[2], set_at(names[2], (every, t_err)))])
        expected = metric(logits, torch.arange(N)) - base  # [N]
    close(ours[0], expected, "joint patch of a head, a feature and the error node vs the spliced transcoder")


# --- every backend, verification and the bound ---------------------------------------------------
def test_every_backend_verify_and_the_bound_run_on_transcoder_nodes(two_ways) -> None:
    model, with_saes, nodes = two_ways
    nodes = nodes[:2] + ["attn_z"]
    ap = run_attribution(model, nodes, "ap")
    iterative = run_attribution(model, nodes, "iterative")
    for key in ap.scores:
        close(iterative.signed[key], ap.signed[key], f"iterative == ap for {key}")
    for method in ("subsampling", "blocks", "hierarchical", "atp+gd"):
        res = run_attribution(with_saes, nodes, method)
        for key in ap.scores:
            assert res.scores[key].shape == ap.scores[key].shape and torch.isfinite(res.scores[key]).all(), \
                f"{method}: {key}"

    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = attribute(with_saes, clean, corrupt, metric, nodes=nodes, method="atp*")
        checked = result.verify(12)
        bound = false_negative_bound(with_saes, clean, corrupt, metric, result, k=12, n_subsets=60, p=0.3)
    assert checked.node_type.str.startswith("transcoder:").any(), "no transcoder node among the top 12"
    for _, row in checked.iterrows():
        coords = tuple(int(row[c]) for c in result.dims[row.node_type])
        truth = float(ap.signed[row.node_type][coords])
        assert row.effect == pytest.approx(truth, rel=1e-9, abs=1e-12), f"verified effect of {row.node}"
    assert 0 < bound.theta < float("inf"), "every unverified node is bounded"


# --- clear errors ----------------------------------------------------------------------------------
def test_a_transcoder_that_does_not_fit_the_model_is_a_clear_error() -> None:
    model = make_model(n_layers=2)
    cases = [
        (make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", d_in=16), "d_in=16"),
        (make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post"), "d_out=32"),
        (make_transcoder("transcoder", "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out"),
         "no hook 'blocks.5.ln2.hook_normalized'"),
        (make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.attn.hook_z"),
         r"\[batch, pos, 4, 8\]"),
        (make_transcoder("transcoder", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"), "runs later"),
    ]
    for tc, match in cases:
        with pytest.raises(ValueError, match=match):
            run_attribution(model, [TranscoderFeatures(tc)], "ap")
    tc = make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    with pytest.raises(TypeError, match="TranscoderFeatures"):
        SAEFeatures(tc)
    with pytest.raises(TypeError, match=r"wrap it: nodes=\[TranscoderFeatures\(\.\.\.\)\]"):
        run_attribution(model, [tc], "atp")
    with pytest.raises(TypeError, match="SAE-Lens Transcoder"):
        TranscoderFeatures(make_sae("standard", "blocks.0.hook_resid_post"))
    tc.cfg.metadata.hook_name_out = None
    with pytest.raises(ValueError, match="hook_name_out"):
        TranscoderFeatures(tc)
    tc.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    ref = spliced(model, [])
    ref.add_sae(tc, use_error_term=False)
    with pytest.raises(ValueError, match="use_error_term=True"):
        run_attribution(ref, [TranscoderFeatures(tc)], "atp")

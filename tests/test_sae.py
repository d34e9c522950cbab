"""SAE features (``atp_plugin.adapters.SAEFeatures``) against independent computations.

- Where the metric is linear in the SAE's site (the site feeds the unembedding of a one-layer model
  without normalisation), AtP is exact: AtP == exact patching, for every SAE architecture.
- AtP equals the formula written out here: (f_i(noise) - f_i(clean)) * (W_dec . dL/da), and
  (e(noise) - e(clean)) . dL/da for the error node, with dL/da from the model's own autograd.
- The adapter's exact patch of a feature equals patching ``hook_sae_acts_post`` in a
  ``HookedSAETransformer`` with the SAE spliced in; its error node equals patching ``hook_sae_error``.
- Every backend gives the same numbers with the SAEs spliced in and without.
- SAEs that do not fit the model, transcoders (sent to ``TranscoderFeatures``), and spliced SAEs
  without error term are clear errors.

SAEs are built from SAE-Lens config classes with random float64 weights (no downloads).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from sae_lens import (GatedSAE, GatedSAEConfig, HookedSAETransformer, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                      StandardSAEConfig, TopKSAE, TopKSAEConfig, Transcoder, TranscoderConfig)
from transformer_lens import HookedTransformer

from atp_plugin import attribute
from atp_plugin.adapters import SAEFeatures
from conftest import clean_gradients, logit_diff_metric, make_model, make_pairs

ARCHS = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, dict(k=4)),
    "topk_rescaled": (TopKSAE, TopKSAEConfig, dict(k=4, rescale_acts_by_decoder_norm=True)),
    "jumprelu_no_b_dec_in": (JumpReLUSAE, JumpReLUSAEConfig, dict(apply_b_dec_to_input=False)),
    "gated": (GatedSAE, GatedSAEConfig, {}),
    "layer_norm": (StandardSAE, StandardSAEConfig, dict(normalize_activations="layer_norm")),
    "constant_norm": (JumpReLUSAE, JumpReLUSAEConfig, dict(normalize_activations="constant_norm_rescale")),
}
METHODS = ["atp", "atp+qk", "atp+gd", "atp*", "ap"]
N, T = 3, 5


def make_sae(arch: str, hook: str, d_in: int = 32, d_sae: int = 12, seed: int = 0, **extra):
    """A random float64 SAE of architecture ``arch`` at ``hook``, biased so that features are active
    on some inputs and not on others."""
    cls, cfg_cls, kw = ARCHS[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, dtype="float64", **{**kw, **extra})
    cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    sae = cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.mul_(3.0)
            elif name == "threshold":
                p.uniform_(0.0, 0.2)
            elif name.startswith(("b_", "r_mag")):
                p.normal_(0, 0.3)
    return sae.eval()


def spliced(model: HookedTransformer, saes: list) -> HookedSAETransformer:
    """The same model as a ``HookedSAETransformer`` with ``saes`` spliced in (error term on)."""
    out = HookedSAETransformer(model.cfg)
    out.load_state_dict(model.state_dict())
    for sae in saes:
        out.add_sae(sae, use_error_term=True)
    return out.eval()


def run(model, nodes, method: str, n: int = N, t: int = T):
    clean, corrupt = make_pairs(n, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(model, clean, corrupt, logit_diff_metric(n), nodes=nodes, method=method)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    scale = float(expected.abs().max())
    assert scale > 1e-6, f"{what}: the expected values are (nearly) all zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


# --- first order is exact where the metric is linear in the site -------------------------------
LINEAR_SITES = {
    **{arch: (dict(n_layers=1, normalization_type=None), "blocks.0.hook_resid_post", {}) for arch in ARCHS},
    "mlp_out_gated": (dict(n_layers=1, normalization_type=None), "blocks.0.hook_mlp_out", {}),
    "hook_z_topk": (dict(n_layers=1, attn_only=True, normalization_type=None), "blocks.0.attn.hook_z",
                    dict(reshape_activations="hook_z")),
    "hook_z_one_head": (dict(n_layers=1, attn_only=True, normalization_type=None), "blocks.0.attn.hook_z",
                        dict(d_in=8)),
}


@pytest.mark.parametrize("case", sorted(LINEAR_SITES))
def test_atp_is_exact_where_the_metric_is_linear_in_the_site(case: str) -> None:
    model_kw, hook, extra = LINEAR_SITES[case]
    arch = {"mlp_out_gated": "gated", "hook_z_topk": "topk", "hook_z_one_head": "standard"}.get(case, case)
    sae = make_sae(arch, hook, **extra)
    if case == "hook_z_one_head":
        sae.cfg.metadata.hook_head_index = 2
    model = make_model(**model_kw)
    atp, ap = run(model, [SAEFeatures(sae)], "atp"), run(model, [SAEFeatures(sae)], "ap")
    name = f"sae:{hook}"
    assert set(atp.signed) == {name, name + ".error"}
    assert atp.signed[name].shape == (T, 12) and atp.signed[name + ".error"].shape == (T,)
    close(atp.signed[name], ap.signed[name], f"{case}: atp == ap for features")
    close(atp.signed[name + ".error"], ap.signed[name + ".error"], f"{case}: atp == ap for the error node")
    # only the last position reaches the metric here; top-k SAEs keep 4 of 12 features there
    assert (ap.signed[name][-1] != 0).sum() >= 3, "hardly any feature changes: the test proves little"


# --- AtP against the formula written out -----------------------------------------------------
def test_atp_equals_the_formula_with_model_gradients() -> None:
    model = make_model(n_layers=2)
    hook = "blocks.0.hook_resid_post"
    sae = make_sae("standard", hook)
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)

    a, grad = clean_gradients(model, clean, metric, [hook])[hook]  # [N, T, d_model] each
    _, cache = model.run_with_cache(corrupt, names_filter=hook)
    a_noise = cache[hook]
    with torch.no_grad():
        f, f_noise = sae.encode(a), sae.encode(a_noise)      # [N, T, d_sae]
        err, err_noise = a - sae.decode(f), a_noise - sae.decode(f_noise)
        per_pair = (f_noise - f) * (grad @ sae.W_dec.T)                        # [N, T, d_sae]
        expected = per_pair.mean(0)
        expected_err = ((err_noise - err) * grad).sum(-1).mean(0)               # [T]

    res = run(model, [SAEFeatures(sae)], "atp")
    close(res.signed[f"sae:{hook}"], expected, "atp for features")
    close(res.signed[f"sae:{hook}.error"], expected_err, "atp for the error node")
    close(res.scores[f"sae:{hook}"], per_pair.abs().mean(0), "|atp| for features")


# --- exact patching against SAE-Lens's own splicing -------------------------------------------
@pytest.mark.parametrize("arch,hook", [("layer_norm", "blocks.0.hook_resid_post"),
                                       ("topk", "blocks.1.attn.hook_z"),
                                       ("jumprelu_no_b_dec_in", "blocks.0.hook_mlp_out")])
def test_exact_patch_equals_patching_the_spliced_sae(arch: str, hook: str) -> None:
    model = make_model(n_layers=2)
    sae = make_sae(arch, hook, **(dict(reshape_activations="hook_z") if hook.endswith("hook_z") else {}))
    res = run(model, [SAEFeatures(sae)], "ap")

    ref = spliced(model, [sae])
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    with torch.no_grad():
        _, noise = ref.run_with_cache(corrupt, names_filter=lambda n: n.startswith(hook + ".hook_sae_"))
        base = metric(ref(clean), torch.arange(N))
        d_sae = sae.cfg.d_sae
        t_of = torch.arange(T).repeat_interleave(d_sae)      # copy k patches (t_of[k], i_of[k])
        i_of = torch.arange(d_sae).repeat(T)
        features, errors = torch.zeros(N, T, d_sae, dtype=torch.float64), torch.zeros(N, T, dtype=torch.float64)
        for p in range(N):
            copies = clean[p].expand(T * d_sae, T)
            f_noise = noise[f"{hook}.hook_sae_acts_post"][p]  # [T, d_sae]

            def set_feature(f, hook):
                f = f.clone()
                f[torch.arange(len(f)), t_of, i_of] = f_noise[t_of, i_of]
                return f

            logits = ref.run_with_hooks(copies, fwd_hooks=[(f"{hook}.hook_sae_acts_post", set_feature)])
            features[p] = (metric(logits, torch.full((T * d_sae,), p)) - base[p]).reshape(T, d_sae)
            e_noise = noise[f"{hook}.hook_sae_error"][p]      # [T, ...]

            def set_error(e, hook):
                e = e.clone()
                e[torch.arange(T), torch.arange(T)] = e_noise
                return e

            logits = ref.run_with_hooks(clean[p].expand(T, T), fwd_hooks=[(f"{hook}.hook_sae_error", set_error)])
            errors[p] = metric(logits, torch.full((T,), p)) - base[p]
    close(res.signed[f"sae:{hook}"], features.mean(0), f"{arch}: feature patch vs spliced hook_sae_acts_post")
    close(res.signed[f"sae:{hook}.error"], errors.mean(0), f"{arch}: error patch vs spliced hook_sae_error")


# --- spliced and plain models agree, for every backend ----------------------------------------
@pytest.fixture(scope="module")
def two_ways():
    """A 3-layer model with three SAEs, plain and with the SAEs spliced in, and what each attributes."""
    model = make_model(n_layers=3)
    saes = [make_sae("standard", "blocks.0.hook_resid_post", seed=1),
            make_sae("topk", "blocks.1.attn.hook_z", seed=2, reshape_activations="hook_z"),
            make_sae("gated", "blocks.2.hook_mlp_out", seed=3)]
    nodes = [SAEFeatures(s) for s in saes] + ["attn_q", "attn_z"]
    return model, spliced(model, saes), nodes


@pytest.mark.parametrize("method", METHODS)
def test_spliced_and_plain_models_give_the_same_numbers(two_ways, method: str) -> None:
    model, with_saes, nodes = two_ways
    plain, spl = run(model, nodes, method), run(with_saes, nodes, method)
    assert set(plain.scores) == set(spl.scores) == {k for a in nodes if not isinstance(a, str)
                                                     for k in (a.name, a.name + ".error")} | {"attn_q", "attn_z"}
    for key in plain.scores:
        close(spl.scores[key], plain.scores[key], f"{method}: scores of {key}")
        if not plain.signed[key].isnan().all():
            close(spl.signed[key], plain.signed[key], f"{method}: signed of {key}")


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_a_spliced_transcoder_and_bypassed_tokens_keep_the_models_gradients(method: str) -> None:
    """SAE-Lens computes the error term under no_grad: spliced, the MLP under a transcoder would get
    no gradient at all, and positions where the SAE is bypassed would get it twice, without the
    host's restoring term."""
    model = make_model(n_layers=2)
    cfg = TranscoderConfig(d_in=32, d_sae=12, d_out=32, dtype="float64", apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    torch.manual_seed(4)
    transcoder = Transcoder(cfg).eval()
    with_saes = spliced(model, [transcoder])
    clean, _ = make_pairs(N, T)
    with_saes.add_sae(make_sae("standard", "blocks.0.hook_resid_post"), use_error_term=True,
                      exclude_special_tokens=clean[:, 1].tolist())
    nodes = ["attn_z", "mlp_neurons", "resid_pre"]
    plain, spl = run(model, nodes, method), run(with_saes, nodes, method)
    for key in nodes:
        close(spl.scores[key], plain.scores[key], f"{method}: {key} under a spliced transcoder and SAE")

def test_several_saes_at_one_hook_with_distinct_names() -> None:
    model = make_model(n_layers=1, normalization_type=None)
    hook = "blocks.0.hook_resid_post"
    a, b = make_sae("standard", hook, seed=1), make_sae("topk", hook, seed=2)
    with pytest.raises(ValueError, match="requested twice"):
        run(model, [SAEFeatures(a), SAEFeatures(b)], "atp")
    both = run(model, [SAEFeatures(a, "a"), SAEFeatures(b, "b")], "ap")
    for name, sae in (("a", a), ("b", b)):
        alone = run(model, [SAEFeatures(sae, name)], "ap")
        close(both.signed[name], alone.signed[name], f"SAE {name} beside another at its hook")
        close(both.signed[name + ".error"], alone.signed[name + ".error"], f"error of SAE {name}")


def test_frame_labels_features() -> None:
    model = make_model(n_layers=1, normalization_type=None)
    res = run(model, [SAEFeatures(make_sae("standard", "blocks.0.hook_resid_post"), "sae0")], "atp")
    frame = res.to_frame()
    feats = frame[frame.node_type == "sae0"]
    assert len(feats) == T * 12 and sorted(feats.feature.unique()) == list(range(12))
    row = feats[(feats.pos == 3) & (feats.feature == 7)].iloc[0]
    assert row.node == "sae0 @3 F7" and row.score == pytest.approx(float(res.scores["sae0"][3, 7]), rel=1e-12)
    errors = frame[frame.node_type == "sae0.error"]
    assert len(errors) == T and errors.feature.isna().all()


@pytest.mark.parametrize("method", ["atp*", "ap"])
def test_transformer_bridge_gives_the_numbers_of_hooked_transformer(tmp_path, method: str) -> None:
    from hf_models import D_VOCAB, load_bridge, load_hooked, save_gpt2

    path = save_gpt2(tmp_path / "gpt2")
    sae = make_sae("jumprelu_no_b_dec_in", "blocks.0.hook_resid_post")
    clean, corrupt = make_pairs(N, T, d_vocab=D_VOCAB)
    metric = logit_diff_metric(N, d_vocab=D_VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge, hooked = (attribute(load(path), clean, corrupt, metric, nodes=[SAEFeatures(sae)], method=method)
                          for load in (load_bridge, load_hooked))
        for key in hooked.scores:
            close(bridge.scores[key], hooked.scores[key], f"{method} on the bridge: {key}")

# --- clear errors ------------------------------------------------------------------------------
def test_an_sae_that_does_not_fit_the_model_is_a_clear_error() -> None:
    model = make_model(n_layers=2)
    with pytest.raises(ValueError, match="d_in=16"):
        run(model, [SAEFeatures(make_sae("standard", "blocks.0.hook_resid_post", d_in=16))], "atp")
    with pytest.raises(ValueError, match="no hook 'blocks.5.hook_resid_post'"):
        run(model, [SAEFeatures(make_sae("standard", "blocks.5.hook_resid_post"))], "atp")
    with pytest.raises(ValueError, match="d_in=32"):
        run(model, [SAEFeatures(make_sae("standard", "blocks.0.mlp.hook_post"))], "atp")  # d_mlp = 64
    with pytest.raises(ValueError, match="reshape_activations='hook_z'"):
        run(model, [SAEFeatures(make_sae("standard", "blocks.0.attn.hook_z", d_in=8))], "atp")
    one_head = make_sae("standard", "blocks.0.attn.hook_z", d_in=8)
    one_head.cfg.metadata.hook_head_index = 4
    with pytest.raises(ValueError, match="no head 4"):
        run(model, [SAEFeatures(one_head)], "atp")
    unhooked = make_sae("standard", "x")
    unhooked.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="names no hook"):
        SAEFeatures(unhooked)
    with pytest.raises(TypeError, match="SAE-Lens SAE"):
        SAEFeatures(model)


def test_a_transcoder_is_sent_to_transcoder_features() -> None:
    cfg = TranscoderConfig(d_in=32, d_sae=8, d_out=32, dtype="float64", apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    with pytest.raises(TypeError, match=r"is a transcoder .*TranscoderFeatures\(transcoder\)"):
        SAEFeatures(Transcoder(cfg))


def test_a_spliced_sae_without_error_term_is_a_clear_error() -> None:
    model = make_model(n_layers=2)
    sae = make_sae("standard", "blocks.0.hook_resid_post")
    ref = spliced(model, [])
    ref.add_sae(sae, use_error_term=False)
    with pytest.raises(ValueError, match="use_error_term=True"):
        run(ref, [SAEFeatures(sae)], "atp")

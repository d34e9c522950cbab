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
from sae_lens import (
    Transcoder,
    TranscoderConfig,
)

from atp_plugin import attribute, metrics
from atp_plugin.adapters import SAEFeatures
from atp_plugin.errors import UnsupportedModelError
from conftest import clean_gradients, logit_diff_metric, make_model, make_pairs
from helpers import (
    SAE_ARCHS,
    SAE_N,
    SAE_T,
    close,
    make_sae,
    reference_gradients,
    run_attribution,
    spliced,
    string_pairs,
    word_tokenizer,
)

METHODS = ["atp", "atp+qk", "atp+gd", "atp*", "ap"]
N, T = SAE_N, SAE_T


# --- first order is exact where the metric is linear in the site -------------------------------
LINEAR_SITES = {
    **{arch: (dict(n_layers=1, normalization_type=None), "blocks.0.hook_resid_post", {}) for arch in SAE_ARCHS},
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
    atp, ap = run_attribution(model, [SAEFeatures(sae)], "atp"), run_attribution(model, [SAEFeatures(sae)], "ap")
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

    res = run_attribution(model, [SAEFeatures(sae)], "atp")
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
    res = run_attribution(model, [SAEFeatures(sae)], "ap")

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

            def set_feature(f, hook, f_noise=f_noise):
                f = f.clone()
                f[torch.arange(len(f)), t_of, i_of] = f_noise[t_of, i_of]
                return f

            logits = ref.run_with_hooks(copies, fwd_hooks=[(f"{hook}.hook_sae_acts_post", set_feature)])
            features[p] = (metric(logits, torch.full((T * d_sae,), p)) - base[p]).reshape(T, d_sae)
            e_noise = noise[f"{hook}.hook_sae_error"][p]      # [T, ...]

            def set_error(e, hook, e_noise=e_noise):
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
    plain, spl = run_attribution(model, nodes, method), run_attribution(with_saes, nodes, method)
    assert set(plain.scores) == set(spl.scores) == {k for a in nodes if not isinstance(a, str)
                                                     for k in (a.name, a.name + ".error")} | {"attn_q", "attn_z"}
    for key in plain.scores:
        close(spl.scores[key], plain.scores[key], f"{method}: scores of {key}")
        if not plain.signed[key].isnan().all():
            close(spl.signed[key], plain.signed[key], f"{method}: signed of {key}")


# --- GradDrop at every kind of site, against a naive reference --------------------------------
# hook -> (architecture, d_in, extra config): one SAE in every GradDrop position class of layer 1
# (on the residual stream before, inside and after it; part of its write; inside it) and at the
# ends. Every architecture here decodes linearly, f @ W_dec + b_dec, so dL/df = W_dec . dL/da.
GRADDROP_SAES = {
    "blocks.1.hook_resid_pre": ("standard", 32, {}),
    "blocks.1.hook_resid_mid": ("topk", 32, {}),
    "blocks.1.hook_resid_post": ("standard", 32, {}),
    "blocks.1.hook_attn_out": ("gated", 32, {}),
    "blocks.1.hook_mlp_out": ("jumprelu_no_b_dec_in", 32, {}),
    "blocks.1.attn.hook_z": ("standard", 32, dict(reshape_activations="hook_z")),
    "blocks.1.mlp.hook_post": ("standard", 64, {}),
    "blocks.0.hook_resid_post": ("gated", 32, {}),
    "blocks.2.hook_mlp_out": ("standard", 32, {}),
    "ln_final.hook_normalized": ("topk", 32, {}),
}


def sae_estimates(sae, clean: torch.Tensor, noise: torch.Tensor, grad: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position first-order estimates of one pair alone, written out from ``sae.encode`` and
    ``sae.decode``: features (f(noise) - f(clean)) * (W_dec . g) ``[T, d_sae]``, error node
    (e(noise) - e(clean)) . g ``[T]``, for site values and gradient ``[1, T, ...]``."""
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[1], -1)  # [1, T, ...] -> [T, d_in]

    with torch.no_grad():
        f, f_noise = sae.encode(clean), sae.encode(noise)  # [1, T, d_sae]
        err, err_noise = flat(clean) - flat(sae.decode(f)), flat(noise) - flat(sae.decode(f_noise))
        features = (f_noise - f)[0] * (flat(grad) @ sae.W_dec.T)
        error = ((err_noise - err) * flat(grad)).sum(-1)
    return features, error


def test_graddrop_of_sae_features_equals_the_naive_reference_at_every_site() -> None:
    """``atp+gd`` and ``atp*`` (and ``atp``) for SAE features and error nodes at every kind of site
    of a 3-layer model, with left-padded string pairs of different lengths in batches of 2, against
    a reference per pair alone, unpadded: GradDrop's I_l from one forward + backward per layer l
    with layer l's attention and MLP outputs detached (test_reference.clean_gradients), so where a
    host puts a hook relative to the cuts (``hook_resid_post`` of layer m sits above layer m) is
    decided by the model's own autograd, not by the engine under test."""
    model = make_model(n_layers=3)
    model.set_tokenizer(word_tokenizer())
    saes = {hook: make_sae(arch, hook, d_in=d_in, seed=i, **extra)
            for i, (hook, (arch, d_in, extra)) in enumerate(GRADDROP_SAES.items())}
    lengths = [4, 6, 3, 5]  # in batches of 2: the longest pair is in the first batch only
    clean, corrupt = string_pairs(lengths, seed=5)
    answers, wrongs = torch.tensor([5, 9, 30, 1]), torch.tensor([7, 2, 11, 40])
    width, n_layers = max(lengths), model.cfg.n_layers

    # (hook, method, 0 features / 1 error) -> sums over pairs, [width, ...]; position p of pair i
    # (length n) is position width - n + p of the padded batch
    sums: dict[tuple[str, str, int], torch.Tensor] = {}
    count = torch.zeros(width, dtype=torch.float64)
    for i, (c, x) in enumerate(zip(clean, corrupt)):
        c_tok, x_tok = model.to_tokens(c, prepend_bos=False), model.to_tokens(x, prepend_bos=False)  # [1, n]
        n = c_tok.shape[1]
        count[width - n:] += 1
        metric = metrics.logit_diff(answers[i:i + 1], wrongs[i:i + 1])
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(c_tok, names_filter=list(saes))
            _, noise_cache = model.run_with_cache(x_tok, names_filter=list(saes))
        full = reference_gradients(model, c_tok, metric, list(saes))
        cuts = [reference_gradients(model, c_tok, metric, list(saes), cut=layer) for layer in range(n_layers)]
        for hook, sae in saes.items():
            atp = sae_estimates(sae, clean_cache[hook], noise_cache[hook], full[hook])
            per_cut = [sae_estimates(sae, clean_cache[hook], noise_cache[hook], g[hook]) for g in cuts]
            for j in (0, 1):
                c_gd = sum(est[j].abs() for est in per_cut) / (n_layers - 1)
                for method, value in (("atp", atp[j].abs()), ("atp signed", atp[j]), ("atp+gd", c_gd)):
                    total = sums.setdefault((hook, method, j), torch.zeros(width, *value.shape[1:],
                                                                           dtype=torch.float64))
                    total[width - n:] += value
    expected = {key: total / count.reshape(width, *[1] * (total.ndim - 1)) for key, total in sums.items()}

    for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
                 "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"):
        for j in (0, 1):  # else atp+gd == atp * L/(L-1) and a misplaced cut could go unseen
            gd, atp = expected[hook, "atp+gd", j], expected[hook, "atp", j] * n_layers / (n_layers - 1)
            assert (gd - atp).abs().max() > 1e-3 * atp.abs().max(), f"GradDrop changes nothing at {hook}"

    nodes = [SAEFeatures(sae) for sae in saes.values()]
    for method in ("atp", "atp+gd", "atp*"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the few-layers GradDrop warning
            got = attribute(model, clean, corrupt, metrics.logit_diff(answers, wrongs), nodes=nodes, method=method,
                            batch_size=2)
        for hook, sae in saes.items():
            assert got.scores[f"sae:{hook}"].shape == (width, sae.cfg.d_sae)
            for j, key in enumerate((f"sae:{hook}", f"sae:{hook}.error")):
                ref = "atp" if method == "atp" else "atp+gd"
                close(got.scores[key], expected[hook, ref, j], f"{method}: scores of {key}")
                if method == "atp":
                    close(got.signed[key], expected[hook, "atp signed", j], f"{method}: signed of {key}")
                else:
                    assert got.signed[key].isnan().all(), f"{method} has no signed value, expected NaN"


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
    plain, spl = run_attribution(model, nodes, method), run_attribution(with_saes, nodes, method)
    for key in nodes:
        close(spl.scores[key], plain.scores[key], f"{method}: {key} under a spliced transcoder and SAE")

def test_several_saes_at_one_hook_with_distinct_names() -> None:
    model = make_model(n_layers=1, normalization_type=None)
    hook = "blocks.0.hook_resid_post"
    a, b = make_sae("standard", hook, seed=1), make_sae("topk", hook, seed=2)
    with pytest.raises(ValueError, match="requested twice"):
        run_attribution(model, [SAEFeatures(a), SAEFeatures(b)], "atp")
    both = run_attribution(model, [SAEFeatures(a, "a"), SAEFeatures(b, "b")], "ap")
    for name, sae in (("a", a), ("b", b)):
        alone = run_attribution(model, [SAEFeatures(sae, name)], "ap")
        close(both.signed[name], alone.signed[name], f"SAE {name} beside another at its hook")
        close(both.signed[name + ".error"], alone.signed[name + ".error"], f"error of SAE {name}")


def test_frame_labels_features() -> None:
    model = make_model(n_layers=1, normalization_type=None)
    res = run_attribution(model, [SAEFeatures(make_sae("standard", "blocks.0.hook_resid_post"), "sae0")], "atp")
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
        run_attribution(model, [SAEFeatures(make_sae("standard", "blocks.0.hook_resid_post", d_in=16))], "atp")
    with pytest.raises(ValueError, match="no hook 'blocks.5.hook_resid_post'"):
        run_attribution(model, [SAEFeatures(make_sae("standard", "blocks.5.hook_resid_post"))], "atp")
    with pytest.raises(ValueError, match="d_in=32"):
        run_attribution(model, [SAEFeatures(make_sae("standard", "blocks.0.mlp.hook_post"))], "atp")  # d_mlp = 64
    with pytest.raises(ValueError, match="reshape_activations='hook_z'"):
        run_attribution(model, [SAEFeatures(make_sae("standard", "blocks.0.attn.hook_z", d_in=8))], "atp")
    one_head = make_sae("standard", "blocks.0.attn.hook_z", d_in=8)
    one_head.cfg.metadata.hook_head_index = 4
    with pytest.raises(ValueError, match="no head 4"):
        run_attribution(model, [SAEFeatures(one_head)], "atp")
    unhooked = make_sae("standard", "x")
    unhooked.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="names no hook"):
        SAEFeatures(unhooked)
    with pytest.raises(TypeError, match=r"SAEFeatures takes an SAE: .*HookedTransformer lacks"):
        SAEFeatures(model)
    with pytest.raises(TypeError, match=r"got a sae_lens\.\S+StandardSAE; wrap it: nodes=\[SAEFeatures\(\.\.\.\)\]"):
        # the SAE itself, not its adapter
        run_attribution(model, [make_sae("standard", "blocks.0.hook_resid_post")], "atp")


def test_a_transcoder_is_sent_to_transcoder_features() -> None:
    cfg = TranscoderConfig(d_in=32, d_sae=8, d_out=32, dtype="float64", apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.0.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    with pytest.raises(TypeError, match=r"is a transcoder .*TranscoderFeatures\(transcoder\)"):
        SAEFeatures(Transcoder(cfg))


def test_graddrops_qk_fix_refuses_an_sae_at_hook_z_without_error_term() -> None:
    """Spliced at hook_z without its error term, an SAE's reconstruction is what the model reads:
    no longer the pattern times the values, which GradDrop's kept QK fix relies on."""
    model = make_model(n_layers=2)
    ref = spliced(model, [])
    ref.add_sae(make_sae("standard", "blocks.0.attn.hook_z", reshape_activations="hook_z"), use_error_term=False)
    with pytest.raises(UnsupportedModelError, match=r"layer 0's head outputs .*use_error_term=True"):
        run_attribution(ref, ["attn_q", "attn_k"], "atp*")


def test_a_spliced_sae_without_error_term_is_a_clear_error() -> None:
    model = make_model(n_layers=2)
    sae = make_sae("standard", "blocks.0.hook_resid_post")
    ref = spliced(model, [])
    ref.add_sae(sae, use_error_term=False)
    with pytest.raises(ValueError, match="use_error_term=True"):
        run_attribution(ref, [SAEFeatures(sae)], "atp")

"""EAP-IG for edges and integrated gradients for nodes (``method="ig"``) against naive references
with TransformerLens hooks (gradients at interpolated token embeddings), and their convergence:
on a linear model with a quadratic metric the right-endpoint rule's error is exactly c/m."""

from __future__ import annotations

import pytest

from conftest import HAS_HOOKED, MISSING

if not HAS_HOOKED:
    pytest.skip(MISSING["hooked"], allow_module_level=True)

import torch

import edge_reference as ref
from atp_plugin import attribute, plugins
from atp_plugin.backends.ig import IntegratedGradients
from atp_plugin.edges import attribute_edges
from conftest import VARIANTS, logit_diff_metric, make_model, make_pairs

N, T = 2, 4


@pytest.mark.parametrize("variant, norm_biases", [("ln_gelu", False), ("gqa", False), ("parallel", False),
                                                   ("rms_rotary_gated", False), ("ln_gelu", True)])
def test_edge_ig_matches_naive(variant, norm_biases):
    """``norm_biases``: LayerNorm biases that are not zero (make_model leaves them at 0): a step's
    reads take each q/k/v value less ln1's bias through W and the read's own bias."""
    model = make_model(0, **VARIANTS[variant])
    if norm_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith((".ln1.b", ".ln2.b", "ln_final.b")):
                    p.normal_(0, 0.3)
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    names, per_pair = ref.eap_ig(model, clean, corrupt, metric, steps=3)
    result = attribute_edges(model, clean, corrupt, metric, method="ig", ig_steps=3, per_position=True)
    order = [result.graph.edge_of[n] for n in names]
    torch.testing.assert_close(result.signed[order], per_pair.mean(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.scores[order], per_pair.abs().mean(0), rtol=1e-9, atol=1e-10)
    # the clean prompt forward, then 3 points forward and backward (the last the corrupt prompt)
    assert result.forward_passes == 4 * N and result.backward_passes == 3 * N


@pytest.mark.parametrize("variant", ["ln_gelu", "gqa"])
def test_node_ig_matches_naive(variant):
    model = make_model(0, **VARIANTS[variant])
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    grads = ref.interpolated_grads(model, clean, corrupt, metric, set(hooks), steps=4)
    noise, clean_acts = ref.cached(model, corrupt, set(hooks)), ref.cached(model, clean, set(hooks))
    want = torch.stack([((noise[h] - clean_acts[h]) * grads[h]).sum(-1) for h in hooks], 1)  # [N, layer, T, head]
    for method, options in ((IntegratedGradients(steps=4), {}), ("ig", {"ig_steps": 4})):  # the two ways agree
        result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method=method, **options)
        torch.testing.assert_close(result.signed["attn_z"], want.mean(0), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(result.scores["attn_z"], want.abs().mean(0), rtol=1e-9, atol=1e-10)
    assert "ig" in plugins.backends()


def quadratic_metric(n: int):
    """(logit(a) - logit(b))^2 at the last position: quadratic in a linear model's residual."""
    diff = logit_diff_metric(n)

    def metric(logits, indices):
        return diff(logits, indices) ** 2
    return metric


def test_ig_converges_at_rate_one_over_m():
    """Linear model, quadratic metric: the gradient is affine along the path, so the right-endpoint
    mean over m points is the integral plus exactly c/m. Summed over every sender into the logits
    (the whole change of the final residual) the integral is L(noise) - L(clean) by the fundamental
    theorem of calculus, computed here from two plain forward passes."""
    model = ref.linear_model(make_model)
    clean, corrupt = make_pairs(N, T)
    metric = quadratic_metric(N)
    with torch.no_grad():
        idx = torch.arange(N)
        total = float((metric(model(corrupt), idx) - metric(model(clean), idx)).mean())
    errors, node_errors = [], []
    for m in (1, 2, 4, 8):
        result = attribute_edges(model, clean, corrupt, metric, method="ig", ig_steps=m)
        into_logits = result.graph.receiver_index == len(result.graph.receivers) - 1
        errors.append(float(result.signed[into_logits].sum()) - total)
        node = attribute(model, clean, corrupt, metric, nodes=["resid_pre"], method=IntegratedGradients(steps=m))
        node_errors.append(float(node.signed["resid_pre"][0].sum()) - total)
    for errs in (errors, node_errors):
        assert abs(errs[0]) > 1e-3  # the rule is not exact at m = 1 here
        for m, e in zip((1, 2, 4, 8), errs):
            assert e * m == pytest.approx(errs[0], rel=1e-8)


def test_ig_per_edge_limit_is_the_trapezoid():
    """Per edge, with an affine gradient along the path, I_m = A + B (m + 1) / (2m): m = 1 is the
    gradient at the corrupt end, EAP (atp) the one at the clean end, and every m lies on that line."""
    model = ref.linear_model(make_model)
    clean, corrupt = make_pairs(N, T)
    metric = quadratic_metric(N)
    atp = attribute_edges(model, clean, corrupt, metric, method="atp", per_position=True).signed
    one = attribute_edges(model, clean, corrupt, metric, method="ig", ig_steps=1, per_position=True).signed
    for m in (3, 5):
        got = attribute_edges(model, clean, corrupt, metric, method="ig", ig_steps=m, per_position=True).signed
        torch.testing.assert_close(got, atp + (one - atp) * (m + 1) / (2 * m), rtol=1e-9, atol=1e-12)


def test_bad_ig_steps():
    model = make_model(0)
    clean, corrupt = make_pairs(N, T)
    with pytest.raises(ValueError, match="ig_steps"):
        attribute_edges(model, clean, corrupt, logit_diff_metric(N), method="ig", ig_steps=0)
    with pytest.raises(ValueError, match="ig_steps must be a positive int"):
        attribute(model, clean, corrupt, logit_diff_metric(N), method="ig", ig_steps=0)
    with pytest.raises(ValueError, match="ig_steps must be a positive int"):
        IntegratedGradients(steps=0)  # at construction, not when run
    with pytest.raises(ValueError, match="ig_steps must be a positive int"):
        attribute_edges(model, clean, corrupt, logit_diff_metric(N), method="atp", ig_steps=True)

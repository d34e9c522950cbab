"""The TransformerBridge host: the same numbers as HookedTransformer on the same weights, for every
method, built-in node type, SAE and transcoder features; gradient capture that cannot silently
return zeros."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from atp_plugin import attribute, metrics
from atp_plugin.adapters import SAEFeatures, TranscoderFeatures
from atp_plugin.adapters.builtin import SliceAdapter
from atp_plugin.attribution import host_for
from atp_plugin.errors import UnsupportedModelError
from conftest import make_model
from helpers import bridge_pairs as pairs  # also imported under this name by test_edges_bridge
from helpers import make_sae, make_transcoder
from hf_models import D_VOCAB, load_bridge, load_hooked, save_gpt2, save_llama, save_tokenizer

ALL_NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons", "resid_pre"]
FIRST_ORDER = ["atp", "atp+qk", "atp+gd", "atp*"]
# hook -> (SAE-Lens architecture, extra config) of the SAE read there; d_in follows the hook's width
SAE_SITES = {
    "blocks.0.hook_resid_pre": ("standard", {}),
    "blocks.0.hook_resid_post": ("topk", {}),
    "blocks.1.hook_attn_out": ("gated", {}),
    "blocks.0.attn.hook_z": ("standard", dict(reshape_activations="hook_z")),
    "blocks.1.mlp.hook_post": ("jumprelu_no_b_dec_in", dict(d_in=128)),
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def bridge(gpt2_dir):
    return load_bridge(gpt2_dir)


@pytest.fixture(scope="module")
def hooked(gpt2_dir):
    return load_hooked(gpt2_dir)


def assert_same(a, b, rtol: float = 1e-10, atol: float = 1e-14):
    assert a.scores.keys() == b.scores.keys()
    for key in a.scores:
        torch.testing.assert_close(a.scores[key], b.scores[key], rtol=rtol, atol=atol, msg=key)
        torch.testing.assert_close(a.signed[key], b.signed[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)


def test_the_bridge_gets_its_own_host(bridge, hooked):
    assert host_for(bridge).name == "TransformerBridge"
    assert host_for(hooked).name == "HookedTransformer"


def test_an_unsupported_model_is_refused_with_the_supported_hosts(gpt2_dir):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float64)
    clean, corrupt, metric = pairs()
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*HookedTransformer.*TransformerBridge"):
        attribute(hf_model, clean, corrupt, metric)


def test_the_bridge_must_be_in_compatibility_mode(gpt2_dir):
    raw = load_bridge(gpt2_dir, compatibility=False)
    clean, corrupt, metric = pairs()
    with pytest.raises(ValueError, match=r"enable_compatibility_mode\(\)"):
        attribute(raw, clean, corrupt, metric)


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
@pytest.mark.parametrize("method", FIRST_ORDER)
def test_first_order_methods_match_hooked_transformer(bridge, hooked, method):
    clean, corrupt, metric = pairs()
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=ALL_NODES, method=method)
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=ALL_NODES, method=method)
    assert_same(on_bridge, on_hooked)
    for key, score in on_bridge.scores.items():
        assert score.abs().max() > 1e-2, f"{key}: scores are all ~0, the comparison would prove nothing"


def test_the_qk_fix_is_active_on_the_bridge(bridge):
    clean, corrupt, metric = pairs()
    plain = attribute(bridge, clean, corrupt, metric, nodes=["attn_q", "attn_k"], method="atp")
    fixed = attribute(bridge, clean, corrupt, metric, nodes=["attn_q", "attn_k"], method="atp+qk")
    for key in ("attn_q", "attn_k"):
        assert (plain.signed[key] - fixed.signed[key]).abs().max() > 1e-4 * fixed.signed[key].abs().max()


def test_exact_patching_matches_hooked_transformer(bridge, hooked):
    clean, corrupt, metric = pairs(n=2, t=5)
    nodes = ["attn_q", "attn_k", "attn_v", "attn_z", "resid_pre"]
    assert_same(attribute(bridge, clean, corrupt, metric, nodes=nodes, method="ap"),
                attribute(hooked, clean, corrupt, metric, nodes=nodes, method="ap"))


def test_exact_patching_matches_a_naive_loop_on_the_bridge(bridge):
    """Patch one head's output at one position by hand with run_with_hooks, pair by pair."""
    clean, corrupt, metric = pairs(n=2, t=5)
    result = attribute(bridge, clean, corrupt, metric, nodes="attn_z", method="ap")
    idx = torch.arange(2)
    with torch.no_grad():
        _, noise = bridge.run_with_cache(corrupt)
        base = metric(bridge(clean), idx)
        for layer, pos, head in [(0, 1, 2), (1, 2, 0), (1, 4, 3)]:
            name = f"blocks.{layer}.attn.hook_z"

            def patch(z, hook, name=name, pos=pos, head=head):
                z = z.clone()
                z[:, pos, head] = noise[name][:, pos, head]
                return z

            effect = metric(bridge.run_with_hooks(clean, fwd_hooks=[(name, patch)]), idx) - base
            torch.testing.assert_close(result.signed["attn_z"][layer, pos, head], effect.mean(), rtol=1e-10, atol=1e-14)


def test_verification_on_the_bridge_matches_hooked_transformer(bridge, hooked):
    clean, corrupt, metric = pairs()
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="atp+qk").verify(6)
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="atp+qk").verify(6)
    assert on_bridge["node"].tolist() == on_hooked["node"].tolist()
    torch.testing.assert_close(torch.tensor(on_bridge["effect"].to_numpy()),
                               torch.tensor(on_hooked["effect"].to_numpy()),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
def test_left_padded_string_prompts_match_hooked_transformer(bridge, hooked):
    clean = ["w1 w2 w3 w4 w5", "w7 w8 w9", "w10 w11 w12 w13"]
    corrupt = ["w1 w6 w3 w4 w5", "w7 w20 w9", "w10 w11 w30 w13"]
    metric = metrics.logit_diff([5, 6, 7], [8, 9, 10])
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=ALL_NODES, method="atp*")
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=ALL_NODES, method="atp*")
    assert on_bridge.alignment.startswith("left-padded")
    assert_same(on_bridge, on_hooked)


def test_the_measured_attention_scale_follows_the_architecture(tmp_path):
    """GPT-2 with scale_attn_by_inverse_layer_idx divides layer l's scores by (l + 1) sqrt(d_head)
    more: the QK fix is right only with the measured scale."""
    path = save_gpt2(tmp_path, seed=3, scale_attn_by_inverse_layer_idx=True)
    bridge, hooked = load_bridge(path), load_hooked(path)
    host = host_for(bridge)
    for layer in range(2):
        assert host.attention(layer).scale == pytest.approx((layer + 1) * math.sqrt(8), rel=1e-12)
    clean, corrupt, metric = pairs(seed=4)
    assert_same(attribute(bridge, clean, corrupt, metric, nodes=["attn_q", "attn_k"], method="atp+qk"),
                attribute(hooked, clean, corrupt, metric, nodes=["attn_q", "attn_k"], method="atp+qk"))


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
def test_rotary_grouped_query_llama_matches_hooked_transformer(tmp_path):
    """Rotary and grouped-query attention through the bridge (the QK fix reads hook_rot_q/k).

    Hugging Face computes the rotary angles in float32, HookedTransformer in float64, so the two
    models' logits differ by ~3e-8; the estimates agree to 2e-5 of the largest score."""
    path = save_llama(tmp_path)
    bridge, hooked = load_bridge(path), load_hooked(path)
    geom = host_for(bridge).attention(1)
    assert (geom.q_hook, geom.k_hook, geom.group) == ("blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", 2)
    clean, corrupt, metric = pairs(n=2, seed=5)
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=ALL_NODES, method="atp*")
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=ALL_NODES, method="atp*")
    for key in ALL_NODES:
        assert on_bridge.scores[key].shape == on_hooked.scores[key].shape
        scale = on_hooked.scores[key].abs().max()
        assert scale > 1e-4
        assert (on_bridge.scores[key] - on_hooked.scores[key]).abs().max() <= 2e-5 * scale, key


def test_alibi_attention_is_refused_by_the_qk_fix_before_any_run(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=D_VOCAB, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                   eos_token_id=1, pad_token_id=0)
    transformers.BloomForCausalLM(cfg).to(torch.float64).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    bridge = load_bridge(tmp_path)
    clean, corrupt, metric = pairs()
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 0 .*BloomForCausalLM.*not softcap\(q \. k / scale\).*method='atp'"):
        attribute(bridge, clean, corrupt, metric, nodes=["attn_z", "attn_q"], method="atp*")


def test_head_outputs_that_are_not_pattern_times_values_are_refused_by_graddrops_qk_fix(gpt2_dir):
    """GradDrop keeps each layer's QK fix factored through z = A v; a permanent hook that rescales
    layer 1's z breaks that, and the engine says so (atp+qk, which does not factor, still runs)."""
    bridge = load_bridge(gpt2_dir)
    bridge.add_hook("blocks.1.attn.hook_z", lambda z, hook: 2 * z)
    clean, corrupt, metric = pairs()
    with pytest.raises(UnsupportedModelError, match=r"layer 1's head outputs at blocks\.1\.attn\.hook_z .*"
                                                    r"relative mismatch 0\.5.*method='atp\+qk'"):
        attribute(bridge, clean, corrupt, metric, nodes=["attn_z", "attn_k"], method="atp*")
    assert attribute(bridge, clean, corrupt, metric, nodes=["attn_k"], method="atp+qk").scores["attn_k"].abs().sum() > 0


def test_a_hook_whose_output_the_bridge_ignores_is_an_error(bridge):
    """The fused qkv hook point never fires on GPT-2 (the bridge splits q, k, v): a node type
    there would get no gradient and no patch; the host says so instead of returning zeros."""
    qkv = SliceAdapter("qkv_out", "blocks.{layer}.attn.qkv.hook_out", None)
    clean, corrupt, metric = pairs()
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn\.qkv\.hook_out.*do not feed the model's output"):
        attribute(bridge, clean, corrupt, metric, nodes=[qkv, "attn_z"], method="atp")


def test_a_missing_gradient_is_an_error_not_zeros():
    """A permanent hook that detaches the residual stream above layer 0 cuts every gradient to
    layer 0: the engine must refuse rather than report zero effects for layer 0's heads."""
    model = make_model(n_layers=2)
    model.blocks[1].hook_resid_pre.add_perma_hook(lambda x, hook: x.detach())
    clean, corrupt, metric = pairs()
    with pytest.raises(RuntimeError, match=r"does not reach hook\(s\) \['blocks\.0\.attn\.hook_z'\]"):
        attribute(model, clean, corrupt, metric, nodes="attn_z", method="atp")


def test_a_detached_hook_on_the_bridge_is_an_error_not_zeros(gpt2_dir):
    bridge = load_bridge(gpt2_dir)
    bridge.hook_dict["blocks.1.hook_resid_pre"].add_perma_hook(lambda x, hook: x.detach())
    clean, corrupt, metric = pairs()
    with pytest.raises(UnsupportedModelError, match=r"\['blocks\.0\.attn\.hook_z'\] .*do not feed the model's output"):
        attribute(bridge, clean, corrupt, metric, nodes="attn_z", method="atp")


def feature_nodes(site: str) -> list:
    """The adapter under test at ``site``: an SAE from ``SAE_SITES``, or the layer-0 MLP transcoder."""
    if site == "transcoder":
        tc = make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
        return [TranscoderFeatures(tc)]
    arch, extra = SAE_SITES[site]
    return [SAEFeatures(make_sae(arch, site, **extra))]


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
@pytest.mark.parametrize("method", ["atp", "atp+gd", "atp*", "ap"])
@pytest.mark.parametrize("site", [*SAE_SITES, "transcoder"])
def test_sae_and_transcoder_features_match_hooked_transformer(bridge, hooked, site, method):
    """SAE features at residual, attention-output, per-head (hook_z, heads flattened) and MLP
    hooks, and a transcoder reading one hook and writing another, give the HookedTransformer
    numbers on the bridge: the adapters only see hook values, which compatibility mode makes equal."""
    clean, corrupt, metric = pairs()
    nodes = feature_nodes(site)
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=nodes, method=method)
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=nodes, method=method)
    assert_same(on_bridge, on_hooked)
    for key, score in on_bridge.scores.items():
        assert score.abs().max() > 1e-2, f"{key}: scores are all ~0, the comparison would prove nothing"


@pytest.mark.filterwarnings("ignore:.*GradDrop degenerates")
@pytest.mark.parametrize("site", [*SAE_SITES, "transcoder"])
def test_verification_of_features_on_the_bridge_matches_hooked_transformer(bridge, hooked, site):
    clean, corrupt, metric = pairs()
    nodes = feature_nodes(site)
    on_bridge = attribute(bridge, clean, corrupt, metric, nodes=nodes, method="atp*").verify(3)
    on_hooked = attribute(hooked, clean, corrupt, metric, nodes=nodes, method="atp*").verify(3)
    assert on_bridge["node"].tolist() == on_hooked["node"].tolist()
    effect = torch.tensor(on_hooked["effect"].to_numpy())
    assert effect.abs().max() > 1e-2, "the top nodes have ~0 effect: the comparison would prove nothing"
    torch.testing.assert_close(torch.tensor(on_bridge["effect"].to_numpy()), effect, rtol=1e-10, atol=1e-14)


def test_features_at_a_hook_the_bridge_lacks_are_an_error(bridge):
    """Every HookedTransformer hook exists on the bridge; an SAE or transcoder at one that does not
    is refused before any run, naming the hook and the config field to check."""
    clean, corrupt, metric = pairs()
    with pytest.raises(ValueError, match=r"no hook 'blocks\.5\.hook_resid_post'.*metadata\.hook_name"):
        attribute(bridge, clean, corrupt, metric, nodes=[SAEFeatures(make_sae("standard", "blocks.5.hook_resid_post"))])
    tc = make_transcoder("transcoder", "blocks.0.ln2.hook_normalized", "blocks.5.hook_mlp_out")
    with pytest.raises(ValueError, match=r"no hook 'blocks\.5\.hook_mlp_out'.*metadata\.hook_name_out"):
        attribute(bridge, clean, corrupt, metric, nodes=[TranscoderFeatures(tc)])


QKV_DEAD = r"\['blocks\.0\.attn\.qkv\.hook_out'\] .*do not feed the model's output"


def qkv_sae() -> SAEFeatures:
    """An SAE on the fused qkv output, a hook point the GPT-2 bridge never fires (it splits q, k, v)."""
    return SAEFeatures(make_sae("standard", "blocks.0.attn.qkv.hook_out", d_in=96))


def test_features_at_a_hook_the_bridge_ignores_are_an_error(bridge):
    clean, corrupt, metric = pairs()
    live = SAEFeatures(make_sae("standard", "blocks.0.hook_resid_post"))
    with pytest.raises(UnsupportedModelError, match=QKV_DEAD):
        attribute(bridge, clean, corrupt, metric, nodes=[qkv_sae(), live], method="atp")


def test_features_only_at_a_hook_the_bridge_ignores_are_an_error(bridge):
    """As above with no other node: no hook of the check fires at all."""
    clean, corrupt, metric = pairs()
    with pytest.raises(UnsupportedModelError, match=QKV_DEAD):
        attribute(bridge, clean, corrupt, metric, nodes=[qkv_sae()], method="atp")

"""atp_plugin.patching against transformer_lens.patching: same shapes always, same values wherever
the first-order estimate is exact, and a naive gradient reference elsewhere."""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import pandas as pd

import pytest
import torch
from transformer_lens import patching as tl_patching

from atp_plugin import patching
from conftest import make_model, make_pairs
from hf_models import load_bridge, load_hooked, save_gpt2

N, T = 3, 5
HEADS = ("out", "q", "k", "v")


def batch_metric(n: int = N, seed: int = 2):
    """TransformerLens-style metric: mean logit difference over the batch, one number."""
    g = torch.Generator().manual_seed(seed)
    answer, wrong = torch.randint(2, 50, (n,), generator=g), torch.randint(2, 50, (n,), generator=g)
    return lambda logits: (logits[torch.arange(n), -1, answer] - logits[torch.arange(n), -1, wrong]).mean()


@contextmanager
def float64_default():
    """transformer_lens.patching stores results in a tensor of the default dtype: make it float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def both(name: str, model, corrupt, cache, metric, **kwargs):
    ours = getattr(patching, name)(model, corrupt, cache, metric, **kwargs)
    with float64_default():
        theirs = getattr(tl_patching, name)(model, corrupt, cache, metric)
    return ours, theirs


def test_every_function_has_the_shape_of_the_original():
    model = make_model(n_layers=2, n_key_value_heads=2, normalization_type="RMS", act_fn="silu", gated_mlp=True,
                       positional_embedding_type="rotary", rotary_dim=8)
    clean, corrupt = make_pairs(2, 4)
    _, cache = model.run_with_cache(clean)
    metric = batch_metric(2)
    expected = {"resid_pre": (2, 4), "resid_mid": (2, 4), "attn_out": (2, 4), "mlp_out": (2, 4),
                "attn_head_out_by_pos": (2, 4, 4), "attn_head_q_by_pos": (2, 4, 4),
                "attn_head_k_by_pos": (2, 4, 2), "attn_head_v_by_pos": (2, 4, 2),
                "attn_head_out_all_pos": (2, 4), "attn_head_q_all_pos": (2, 4),
                "attn_head_k_all_pos": (2, 2), "attn_head_v_all_pos": (2, 2), "block_every": (3, 2, 4)}
    assert sorted(patching.__all__) == sorted([f"get_act_patch_{k}" for k in expected]
                                              + ["get_act_patch_mlp_neurons_by_pos", "get_act_patch_mlp_neurons_all_pos"])
    for suffix, shape in expected.items():
        ours, theirs = both(f"get_act_patch_{suffix}", model, corrupt, cache, metric)
        assert tuple(ours.shape) == tuple(theirs.shape) == shape, suffix
        assert torch.isfinite(ours).all()
    for suffix, shape in {"mlp_neurons_by_pos": (2, 4, 64), "mlp_neurons_all_pos": (2, 64)}.items():
        assert tuple(getattr(patching, f"get_act_patch_{suffix}")(model, corrupt, cache, metric).shape) == shape


@pytest.mark.parametrize("name", [f"get_act_patch_attn_head_{h}_by_pos" for h in HEADS]
                         + [f"get_act_patch_attn_head_{h}_all_pos" for h in ("out", "q", "v")]
                         + ["get_act_patch_attn_out"])
def test_values_equal_transformer_lens_where_first_order_is_exact(name):
    """One attention-only layer, no LayerNorm, a logit difference: the logits are linear in each
    head's output and value, and in each attention row, so AtP is exact for z and v, and the QK
    fix (exact through the softmax) for a query, a key, and all of a head's queries at once."""
    model = make_model(n_layers=1, attn_only=True, normalization_type=None)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    ours, theirs = both(name, model, corrupt, cache, batch_metric())
    assert theirs.abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_mlp_out_equals_transformer_lens_in_a_one_layer_model_without_layernorm():
    model = make_model(n_layers=1, normalization_type=None)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    ours, theirs = both("get_act_patch_mlp_out", model, corrupt, cache, batch_metric())
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def tl_neurons(model, corrupt, cache, metric) -> torch.Tensor:
    """Every neuron patched by transformer_lens.patching's generic patcher: [n_layers, pos, d_mlp]."""
    shape = (model.cfg.n_layers, corrupt.shape[1], model.cfg.d_mlp)
    index = pd.DataFrame(list(itertools.product(*map(range, shape))), columns=["layer", "pos", "neuron"])
    with float64_default():
        flat = tl_patching.generic_activation_patch(model, corrupt, cache, metric,
                                                    tl_patching.layer_pos_head_vector_patch_setter, "post",
                                                    index_df=index)
    return flat.reshape(shape)


@pytest.mark.parametrize("gated", [False, True])
def test_neurons_equal_transformer_lens_where_first_order_is_exact(gated):
    """One layer, no LayerNorm, a logit difference: the logits are linear in each neuron's output."""
    model = make_model(n_layers=1, normalization_type=None, d_mlp=16, gated_mlp=gated)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    metric = batch_metric()
    theirs = tl_neurons(model, corrupt, cache, metric)
    ours = patching.get_act_patch_mlp_neurons_by_pos(model, corrupt, cache, metric)
    assert (theirs - metric(model(corrupt))).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    all_pos = patching.get_act_patch_mlp_neurons_all_pos(model, corrupt, cache, metric)
    assert all_pos.shape == (1, 16)
    torch.testing.assert_close(all_pos, metric(model(corrupt)) + (theirs - metric(model(corrupt))).sum(1),
                               rtol=1e-9, atol=1e-12)


def test_the_baseline_is_the_corrupted_run_and_the_estimate_is_the_gradient_dot_product():
    """AtP by hand: metric(corrupted run) + sum over prompts of (q_clean - q_corrupt) . dmetric/dq,
    gradients on the corrupted run, for every layer, position and head."""
    model = make_model(n_layers=2)
    clean, corrupt = make_pairs(N, T)
    metric = batch_metric()
    _, cache = model.run_with_cache(clean)
    ours = patching.get_act_patch_attn_head_q_by_pos(model, corrupt, cache, metric, method="atp")
    expected = torch.zeros(2, T, 4, dtype=torch.float64)
    for layer in range(2):
        name = f"blocks.{layer}.attn.hook_q"
        kept = {}

        def keep(q, hook, kept=kept):
            kept["q"] = q
            return q

        value = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, keep)]))
        (grad,) = torch.autograd.grad(value, kept["q"])  # [batch, pos, head, d_head]
        expected[layer] = value.detach() + ((cache[name] - kept["q"].detach()) * grad).sum((0, 3))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("method", ["atp", "atp+qk"])
def test_all_positions_is_the_sum_of_the_per_position_changes(head, method):
    model = make_model(n_layers=2)
    clean, corrupt = make_pairs(N, T)
    metric = batch_metric()
    _, cache = model.run_with_cache(clean)
    with torch.no_grad():
        base = metric(model(corrupt))
    by_pos = getattr(patching, f"get_act_patch_attn_head_{head}_by_pos")(model, corrupt, cache, metric, method=method)
    all_pos = getattr(patching, f"get_act_patch_attn_head_{head}_all_pos")(model, corrupt, cache, metric, method=method)
    torch.testing.assert_close(all_pos, base + (by_pos - base).sum(1), rtol=1e-10, atol=1e-12)


def test_the_bridge_gives_the_hooked_transformer_numbers(tmp_path):
    path = save_gpt2(tmp_path)
    bridge, hooked = load_bridge(path), load_hooked(path)
    clean, corrupt = make_pairs(N, T)
    metric = batch_metric()
    for name in ("get_act_patch_block_every", "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_out_all_pos"):
        outs = [getattr(patching, name)(m, corrupt, m.run_with_cache(clean)[1], metric) for m in (bridge, hooked)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_explicit_clean_tokens_give_the_same_numbers():
    model = make_model(n_layers=2)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    recovered = patching.get_act_patch_resid_pre(model, corrupt, cache, batch_metric())
    given = patching.get_act_patch_resid_pre(model, corrupt, cache, batch_metric(), clean_tokens=clean)
    torch.testing.assert_close(recovered, given, rtol=0, atol=0)


def test_bad_input_gets_a_clear_error():
    model = make_model(n_layers=2)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    fn = patching.get_act_patch_attn_head_out_by_pos
    with pytest.raises(TypeError, match="one number for the whole batch"):
        fn(model, corrupt, cache, lambda logits: logits[:, -1, 0])
    with pytest.raises(TypeError, match=r"\.item\(\) or detach"):
        fn(model, corrupt, cache, lambda logits: logits[:, -1, 0].mean().detach())
    with pytest.raises(ValueError, match=r"GradDrop.*unsigned"):
        fn(model, corrupt, cache, batch_metric(), method="atp*")
    with pytest.raises(TypeError, match=r"integer token tensor of shape \[batch, pos\]"):
        fn(model, corrupt.double(), cache, batch_metric())
    with pytest.raises(ValueError, match=r"shape .*same shape"):
        fn(model, corrupt[:, :-1], cache, batch_metric())
    _, no_embed = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    with pytest.raises(ValueError, match=r"no 'hook_embed'.*names_filter"):
        fn(model, corrupt, no_embed, batch_metric())
    _, other_model = make_model(n_layers=2, seed=5).run_with_cache(clean)
    with pytest.raises(ValueError, match=r"not rows of model\.W_E.*clean_tokens="):
        fn(model, corrupt, other_model, batch_metric())
    with pytest.raises(ValueError, match=r"clean_cache\['blocks\.0\.attn\.hook_z'\] does not match"):
        fn(model, corrupt, other_model, batch_metric(), clean_tokens=clean)

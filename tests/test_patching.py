"""atp_plugin.patching against transformer_lens.patching: same shapes always, same values wherever
the first-order estimate is exact (one attention-only layer; a multi-layer affine model), and
AtP / the QK fix written out with TransformerLens hooks elsewhere, for every function.

The one-layer and affine models (no LayerNorm) are HookedTransformers (TransformerLens 3); the other
tests also run on a GPT-2 TransformerBridge (and the shapes on a Llama one), under TransformerLens 3
and 4."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Callable

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from atp_plugin import patching
from conftest import VARIANTS, host_model, make_bridge, make_model, make_pairs, needs_hooked, needs_hooked_for
from hf_models import load_bridge, load_hooked, save_gpt2

N, T = 3, 5
HEADS = ("out", "q", "k", "v")
needs_exact = needs_hooked_for("a model without LayerNorm, where first order is exact (make_model)")


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


@pytest.mark.parametrize("name", ["attn_head_out_by_pos", "attn_head_k_all_pos", "mlp_neurons_by_pos",
                                  "block_every"])
def test_the_cost_is_four_forward_passes_and_one_backward(host, name):
    """As the README says: whatever the function and the number of nodes, four forward passes of the
    batch and one backward pass (counted by module hooks on the embedding and the unembedding)."""
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    calls = {"forward": 0, "backward": 0}

    def forward(module, args, out) -> None:  # passes of the T-token batch: not a Bridge host's hook
        if args[0].shape[-1] == T:            # probes (once per model and hook point, on a 4-token prompt)
            calls["forward"] += 1

    def backward(module, grad_input, grad_output) -> None:
        if grad_output[0].shape[-2] == T:  # [batch, pos, d_vocab]
            calls["backward"] += 1

    handles = [model.embed.register_forward_hook(forward), model.unembed.register_full_backward_hook(backward)]
    try:
        getattr(patching, f"get_act_patch_{name}")(model, corrupt, cache, batch_metric())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"forward": 4, "backward": 1}


@pytest.mark.parametrize("host", [pytest.param("hooked", marks=needs_hooked), "bridge_llama"])
def test_every_function_has_the_shape_of_the_original(host):
    """2 layers, 4 heads, 2 kv-heads, 64 neurons: a HookedTransformer or a Llama TransformerBridge."""
    model = make_bridge(llama=True) if host == "bridge_llama" else make_model(
        n_layers=2, n_key_value_heads=2, normalization_type="RMS", act_fn="silu", gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=8)
    clean, corrupt = make_pairs(2, 4)
    _, cache = model.run_with_cache(clean)
    metric = batch_metric(2)
    expected = {"resid_pre": (2, 4), "resid_mid": (2, 4), "attn_out": (2, 4), "mlp_out": (2, 4),
                "attn_head_out_by_pos": (2, 4, 4), "attn_head_q_by_pos": (2, 4, 4),
                "attn_head_k_by_pos": (2, 4, 2), "attn_head_v_by_pos": (2, 4, 2),
                "attn_head_out_all_pos": (2, 4), "attn_head_q_all_pos": (2, 4),
                "attn_head_k_all_pos": (2, 2), "attn_head_v_all_pos": (2, 2), "block_every": (3, 2, 4)}
    neurons = ["get_act_patch_mlp_neurons_by_pos", "get_act_patch_mlp_neurons_all_pos"]
    assert sorted(patching.__all__) == sorted([f"get_act_patch_{k}" for k in expected] + neurons)
    for suffix, shape in expected.items():
        ours, theirs = both(f"get_act_patch_{suffix}", model, corrupt, cache, metric)
        assert tuple(ours.shape) == tuple(theirs.shape) == shape, suffix
        assert torch.isfinite(ours).all()
    for suffix, shape in {"mlp_neurons_by_pos": (2, 4, 64), "mlp_neurons_all_pos": (2, 64)}.items():
        assert tuple(getattr(patching, f"get_act_patch_{suffix}")(model, corrupt, cache, metric).shape) == shape


ONE_LAYER = {"mha": {}, "gqa": dict(n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)}


@needs_exact
@pytest.mark.parametrize("kind", sorted(ONE_LAYER))
@pytest.mark.parametrize("name", [f"get_act_patch_attn_head_{h}_by_pos" for h in HEADS]
                         + [f"get_act_patch_attn_head_{h}_all_pos" for h in ("out", "q", "v")]
                         + ["get_act_patch_attn_out"])
def test_values_equal_transformer_lens_where_first_order_is_exact(name, kind):
    """One attention-only layer, no LayerNorm, a logit difference: the logits are linear in each
    head's output and value, and in each attention row, so AtP is exact for z and v, and the QK
    fix (exact through the softmax) for a query, a key, and all of a head's queries at once. With
    grouped-query attention ("gqa": 2 kv-heads for 4 heads, rotary) a key or value feeds two heads;
    the logits are linear in both heads' rows, so the same holds per kv-head."""
    model = make_model(n_layers=1, attn_only=True, normalization_type=None, **ONE_LAYER[kind])
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    metric = batch_metric()
    ours, theirs = both(name, model, corrupt, cache, metric)
    with torch.no_grad():
        assert (theirs - metric(model(corrupt))).abs().max() > 1e-3  # patching changes the metric
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@needs_exact
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


@needs_exact
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


def test_the_baseline_is_the_corrupted_run_and_the_estimate_is_the_gradient_dot_product(host):
    """AtP by hand: metric(corrupted run) + sum over prompts of (q_clean - q_corrupt) . dmetric/dq,
    gradients on the corrupted run, for every layer, position and head."""
    model = host_model(host, n_layers=2)
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
def test_all_positions_is_the_sum_of_the_per_position_changes(host, head, method):
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(N, T)
    metric = batch_metric()
    _, cache = model.run_with_cache(clean)
    with torch.no_grad():
        base = metric(model(corrupt))
    by_pos = getattr(patching, f"get_act_patch_attn_head_{head}_by_pos")(model, corrupt, cache, metric, method=method)
    all_pos = getattr(patching, f"get_act_patch_attn_head_{head}_all_pos")(model, corrupt, cache, metric, method=method)
    torch.testing.assert_close(all_pos, base + (by_pos - base).sum(1), rtol=1e-10, atol=1e-12)


@needs_hooked
def test_the_bridge_gives_the_hooked_transformer_numbers(tmp_path):
    path = save_gpt2(tmp_path)
    bridge, hooked = load_bridge(path), load_hooked(path)
    clean, corrupt = make_pairs(N, T)
    metric = batch_metric()
    for name in ("get_act_patch_block_every", "get_act_patch_attn_head_k_by_pos",
                 "get_act_patch_attn_head_out_all_pos"):
        outs = [getattr(patching, name)(m, corrupt, m.run_with_cache(clean)[1], metric) for m in (bridge, hooked)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_explicit_clean_tokens_give_the_same_numbers(host):
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    recovered = patching.get_act_patch_resid_pre(model, corrupt, cache, batch_metric())
    given = patching.get_act_patch_resid_pre(model, corrupt, cache, batch_metric(), clean_tokens=clean)
    torch.testing.assert_close(recovered, given, rtol=0, atol=0)


def test_bad_input_gets_a_clear_error(host):
    model = host_model(host, n_layers=2)
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
    _, other_model = host_model(host, 5, n_layers=2).run_with_cache(clean)
    with pytest.raises(ValueError, match=r"not rows of model\.W_E.*clean_tokens="):
        fn(model, corrupt, other_model, batch_metric())
    with pytest.raises(ValueError, match=r"clean_cache\['blocks\.0\.attn\.hook_z'\] does not match"):
        fn(model, corrupt, other_model, batch_metric(), clean_tokens=clean)


# --- every function against TransformerLens where the model makes AtP exact, and against a
# --- hand-written AtP (value difference dot gradient, or the QK fix) on models where it is not

#: function suffix (without _by_pos/_all_pos) -> (TransformerLens hook, one per layer; whether the
#: last dimension is summed: the d_model / d_head of a vector node, not the neurons of hook_post)
SITES = {
    "resid_pre": ("blocks.{}.hook_resid_pre", True),
    "resid_mid": ("blocks.{}.hook_resid_mid", True),
    "attn_out": ("blocks.{}.hook_attn_out", True),
    "mlp_out": ("blocks.{}.hook_mlp_out", True),
    "attn_head_out": ("blocks.{}.attn.hook_z", True),
    "attn_head_q": ("blocks.{}.attn.hook_q", True),
    "attn_head_k": ("blocks.{}.attn.hook_k", True),
    "attn_head_v": ("blocks.{}.attn.hook_v", True),
    "mlp_neurons": ("blocks.{}.mlp.hook_post", False),
}
BLOCK_EVERY = ("resid_pre", "attn_out", "mlp_out")  # transformer_lens.patching.get_act_patch_block_every's order
ALL_FUNCTIONS = ([f"get_act_patch_{s}" for s in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every")]
                 + [f"get_act_patch_{s}_{p}" for s in SITES if s.startswith(("attn_head", "mlp_neurons"))
                    for p in ("by_pos", "all_pos")])


def test_the_value_tests_below_cover_every_function():
    assert sorted(ALL_FUNCTIONS) == sorted(patching.__all__)


def largest_per_layer(change: torch.Tensor, name: str) -> torch.Tensor:
    """max |change| of each layer (of each site for block_every): ``[n_layers]`` or ``[3, n_layers]``."""
    return change.flatten(2 if name.endswith("block_every") else 1).abs().amax(-1)


def make_affine_model(n_key_value_heads: int | None = None):
    """Three layers whose logits are affine in every activation TransformerLens patches, so AtP is
    exact everywhere but at queries and keys: no LayerNorm, W_Q = W_K = b_Q = b_K = 0 (every
    attention pattern uniform over the causal past, whatever the prompt) and ReLU MLPs whose
    b_in is so large that no neuron is ever off (each MLP affine; b_out takes the shift back out).
    Queries and keys do nothing."""
    model = make_model(n_layers=3, normalization_type=None, act_fn="relu", n_key_value_heads=n_key_value_heads)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("W_Q", "W_K", "b_Q", "b_K"):
                getattr(block.attn, name).zero_()
            block.mlp.b_in.add_(20.0)
            block.mlp.b_out.sub_(20.0 * block.mlp.W_out.sum(0))  # the residual stream stays small
    return model


def pre_activations(model, tokens: torch.Tensor) -> torch.Tensor:
    """Every MLP pre-activation of a run of ``tokens``: ``[n_layers, batch, pos, d_mlp]``."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_pre"))
    return torch.stack([cache[f"blocks.{layer}.mlp.hook_pre"] for layer in range(model.cfg.n_layers)])


AFFINE_EXACT = ([f"get_act_patch_{s}" for s in ("resid_pre", "resid_mid", "attn_out", "mlp_out", "block_every")]
                + [f"get_act_patch_attn_head_{h}_{p}" for h in ("out", "v") for p in ("by_pos", "all_pos")])


@needs_exact
@pytest.mark.parametrize("n_kv", [None, 2])
@pytest.mark.parametrize("name", AFFINE_EXACT)
def test_values_equal_transformer_lens_in_a_multi_layer_affine_model(name, n_kv):
    """Three layers with MLPs, grouped-query (2 kv-heads for 4 heads) or not: every residual site,
    attention and MLP output, head output and value equals TransformerLens's patching to 1e-9,
    and every layer's site changes the metric. Exact patching cannot tell resid_mid from
    resid_post (the MLP acts on each position alone, so a clean resid_mid makes a clean
    resid_post): the hand-written AtP below pins that hook."""
    model = make_affine_model(n_kv)
    clean, corrupt = make_pairs(N, T)
    assert pre_activations(model, clean).min() > 5 and pre_activations(model, corrupt).min() > 5  # ReLUs stay on
    _, cache = model.run_with_cache(clean)
    metric = batch_metric()
    ours, theirs = both(name, model, corrupt, cache, metric)
    with torch.no_grad():
        change = theirs - metric(model(corrupt))
    assert largest_per_layer(change, name).min() > 1e-3  # every layer (and row of block_every) matters
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@needs_exact
def test_neurons_equal_transformer_lens_in_a_multi_layer_affine_model():
    model = make_affine_model()
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    metric = batch_metric()
    theirs = tl_neurons(model, corrupt, cache, metric)
    with torch.no_grad():
        assert (theirs - metric(model(corrupt))).abs().amax((1, 2)).min() > 1e-3
    torch.testing.assert_close(patching.get_act_patch_mlp_neurons_by_pos(model, corrupt, cache, metric), theirs,
                               rtol=1e-9, atol=1e-12)


def keep_in(store: dict[str, torch.Tensor], name: str) -> Callable[..., torch.Tensor]:
    """A TransformerLens hook that stores its activation in ``store`` under ``name``, the name it is
    added at (on a Bridge, ``hook.name`` is that of the point the name aliases)."""
    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        store[name] = x
        return x
    return keep


def hand_atp(model, corrupt, cache, metric, fmt: str, sum_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AtP written out with TransformerLens hooks at ``fmt`` (one per layer): the corrupted run's
    metric and, per layer, sum over prompts (and the last axis where ``sum_last``) of
    (clean value - corrupted value) . d metric / d value, the gradient taken on the corrupted run:
    ``[n_layers, pos, *node]``."""
    names = [fmt.format(layer) for layer in range(model.cfg.n_layers)]
    kept = {}
    value = metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, keep_in(kept, n)) for n in names]))
    grads = torch.autograd.grad(value, [kept[n] for n in names])
    changes = [((cache[n] - kept[n].detach()) * g).sum(0) for n, g in zip(names, grads)]  # [pos, ...]
    return value.detach(), torch.stack([c.sum(-1) if sum_last else c for c in changes])


def hand_qk(model, corrupt, cache, metric, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The QK fix written out with TransformerLens hooks at ``fmt`` (hook_q or hook_k, one per
    layer), one patched run per query or key: the corrupted run's metric and, per layer, position
    and (kv-)head, sum over t, s of
    (A'_ts - A_ts) . d metric / d A_ts, where A' is the attention pattern of every head of that
    layer (every query head a kv-head feeds) with only that one query or key set to its clean
    value, and the gradient is taken on the corrupted run: ``[n_layers, pos, n_(kv_)heads]``."""
    n_layers, pos = model.cfg.n_layers, corrupt.shape[1]
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    kept = {}
    value = metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, keep_in(kept, n)) for n in patterns]))
    grads = torch.autograd.grad(value, [kept[n] for n in patterns])  # [batch, head, t, s] each
    n_nodes = cache[fmt.format(0)].shape[2]
    out = torch.zeros(n_layers, pos, n_nodes, dtype=torch.float64)
    for layer, p, node in itertools.product(range(n_layers), range(pos), range(n_nodes)):
        site = fmt.format(layer)

        def patch(x, hook, p=p, node=node, name=site):
            x = x.clone()
            x[:, p, node] = cache[name][:, p, node]
            return x

        new = {}  # the patched run's pattern at this layer
        with torch.no_grad():
            model.run_with_hooks(corrupt, stop_at_layer=layer + 1,
                                 fwd_hooks=[(site, patch), (patterns[layer], keep_in(new, patterns[layer]))])
        out[layer, p, node] = ((new[patterns[layer]] - kept[patterns[layer]].detach()) * grads[layer]).sum()
    return value.detach(), out


@pytest.fixture(scope="module", params=[pytest.param("ln_gelu", marks=needs_hooked),
                                        pytest.param("gqa", marks=needs_hooked), "bridge"])
def generic(request):
    """A three-layer model where no function is exact (LayerNorm or RMSNorm, GELU or gated SiLU
    MLPs; "gqa": rotary, 2 kv-heads for 4 heads; "bridge": a GPT-2 TransformerBridge), its pairs,
    clean cache and metric."""
    model = make_bridge(0, 3) if request.param == "bridge" else make_model(**VARIANTS[request.param])
    clean, corrupt = make_pairs(N, T)
    _, cache = model.run_with_cache(clean)
    return model, corrupt, cache, batch_metric()


@pytest.mark.parametrize("name", ALL_FUNCTIONS)
def test_values_equal_hand_written_atp_where_first_order_is_not_exact(generic, name):
    """Every function with its default method ('atp+qk': AtP, the QK fix for queries and keys)
    equals the hand-written reference to 1e-10; an all-positions entry is the sum over positions
    of the per-position changes (for keys: of each key's QK fix)."""
    model, corrupt, cache, metric = generic
    suffix = name.removeprefix("get_act_patch_")
    site = suffix.removesuffix("_by_pos").removesuffix("_all_pos")
    sites = BLOCK_EVERY if site == "block_every" else (site,)
    refs = [hand_qk(model, corrupt, cache, metric, SITES[s][0]) if s in ("attn_head_q", "attn_head_k")
            else hand_atp(model, corrupt, cache, metric, *SITES[s]) for s in sites]
    base = refs[0][0]
    changes = [c.sum(1) if suffix.endswith("_all_pos") else c for _, c in refs]
    expected = base + (changes[0] if len(changes) == 1 else torch.stack(changes))
    assert largest_per_layer(expected - base, name).min() > 1e-4  # every layer (and row of block_every) matters
    torch.testing.assert_close(getattr(patching, name)(model, corrupt, cache, metric), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", ("q", "k"))
@pytest.mark.parametrize("pos", ("by_pos", "all_pos"))
def test_queries_and_keys_with_plain_atp_equal_the_gradient_dot_product(generic, head, pos):
    """method='atp' for queries and keys (kv-heads under grouped-query attention) is the gradient
    at hook_q / hook_k dotted with the difference, and differs from the QK fix (default)."""
    model, corrupt, cache, metric = generic
    name = f"get_act_patch_attn_head_{head}_{pos}"
    base, change = hand_atp(model, corrupt, cache, metric, *SITES[f"attn_head_{head}"])
    expected = base + (change.sum(1) if pos == "all_pos" else change)
    ours = getattr(patching, name)(model, corrupt, cache, metric, method="atp")
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert (getattr(patching, name)(model, corrupt, cache, metric) - ours).abs().max() > 1e-6


def test_resid_mid_is_not_resid_post(generic):
    """AtP at hook_resid_mid and at hook_resid_post differ (exact patching cannot tell them apart,
    see above), so the hand-written test pins get_act_patch_resid_mid to the right hook."""
    model, corrupt, cache, metric = generic
    ours = patching.get_act_patch_resid_mid(model, corrupt, cache, metric)
    base, post = hand_atp(model, corrupt, cache, metric, "blocks.{}.hook_resid_post", True)
    assert (ours - (base + post)).abs().max() > 1e-3

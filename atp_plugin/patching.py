"""Drop-in replacements for ``transformer_lens.patching``'s ``get_act_patch_*`` functions,
computed with AtP (plus the QK fix for queries and keys) in four forward passes and one backward
pass over the batch (a check of ``clean_cache``, the clean values, the corrupted run with its
gradient, the corrupted run's metric), whatever the number of indices, instead of one patched
forward pass per index.

Same arguments, same output shapes, same meaning as TransformerLens::

    from atp_plugin import patching            # instead of: from transformer_lens import patching
    out = patching.get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, metric)
    # [n_layers, pos, n_heads]

Direction and meaning, as in TransformerLens: the model runs ``corrupted_tokens`` and one
activation is patched to its value in ``clean_cache``; ``patching_metric(logits)`` maps the logits
of the whole batch to one number, and each entry of the output is the *metric of the patched run*
(not its difference from the unpatched one). Here each entry is the unpatched corrupted run's
metric plus the first-order (AtP) estimate of the change, so it is exact wherever the metric is
linear in the patched activation (a head's output or value with a fixed attention pattern feeding
a linear readout) and an estimate elsewhere. For queries and keys ``method="atp+qk"`` (default)
recomputes the attention pattern exactly and linearizes only after the softmax (AtP*'s QK fix).
GradDrop, AtP*'s other half, yields unsigned scores that cannot be a metric value; rank with
``atp_plugin.attribute(..., method="atp*")`` for that.

An "all positions" entry patches a head at every position at once; its estimate is the sum of
the per-position estimates (exact for AtP; for keys the QK fix is then applied key by key).

The clean tokens are recovered from ``clean_cache["hook_embed"]`` (rows of the embedding matrix);
pass ``clean_tokens=`` for models whose ``hook_embed`` is not ``W_E[tokens]``. The cache is checked
against a run of those tokens before anything else. Works with ``HookedTransformer`` and
``TransformerBridge`` (compatibility mode). Neurons, which TransformerLens patches only through
``generic_activation_patch`` on ``hook_post``, get ``get_act_patch_mlp_neurons_by_pos`` and
``get_act_patch_mlp_neurons_all_pos`` in the same style. Not covered: attention-pattern patching
(``get_act_patch_attn_head_pattern_*`` and the ``*_every`` helpers that include it); the
``index_df``/``return_index_df`` options of ``generic_activation_patch``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import plugins
from .adapters import NodeAdapter
from .adapters.builtin import SliceAdapter
from .attribution import attribute, host_for
from .engine.runs import run

PatchingMetric = Callable[[torch.Tensor], torch.Tensor]
SIGNED_METHODS = ("atp", "atp+qk")

#: sites TransformerLens patches that are not built-in node types: a whole vector per position
RESID_MID = SliceAdapter("resid_mid", "blocks.{layer}.hook_resid_mid", None)
ATTN_OUT = SliceAdapter("attn_out", "blocks.{layer}.hook_attn_out", None)
MLP_OUT = SliceAdapter("mlp_out", "blocks.{layer}.hook_mlp_out", None)


def _tokens(corrupted_tokens: Any) -> torch.Tensor:
    if not isinstance(corrupted_tokens, torch.Tensor) or corrupted_tokens.is_floating_point() \
            or corrupted_tokens.ndim != 2:
        raise TypeError("corrupted_tokens must be an integer token tensor of shape [batch, pos], got "
                        f"{getattr(corrupted_tokens, 'dtype', type(corrupted_tokens).__name__)} of shape "
                        f"{tuple(getattr(corrupted_tokens, 'shape', ()))}")
    return corrupted_tokens


def _cached(clean_cache: Any, hook: str, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        value = clean_cache[hook]
    except (KeyError, TypeError):
        raise ValueError(f"clean_cache has no {hook!r}: either the model never computes it (an attention-only "
                         "model has no MLP) or the cache was made with a names_filter that drops it") from None
    if tuple(value.shape[:2]) != shape:
        raise ValueError(f"clean_cache[{hook!r}] has shape {tuple(value.shape)} but corrupted_tokens has shape "
                         f"{shape}: the clean and corrupted prompts must have the same shape (and the cache its "
                         "batch dimension, remove_batch_dim=False)")
    return value


def _clean_tokens_from_cache(model: Any, clean_cache: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The token ids ``[batch, pos]`` whose embeddings ``clean_cache["hook_embed"]`` holds.

    Each cached embedding must be a row of ``model.W_E`` (to float rounding); otherwise pass the
    clean tokens explicitly.
    """
    emb = _cached(clean_cache, "hook_embed", shape).detach()
    table = model.W_E.detach().to(emb.device, emb.dtype)  # [d_vocab, d_model]
    flat = emb.reshape(-1, emb.shape[-1])  # [batch * pos, d_model]
    dist = (table ** 2).sum(-1)[None] - 2 * flat @ table.T  # squared distance minus |e|^2
    ids = dist.argmin(-1)
    miss = (table[ids] - flat).abs().max()
    if miss > 1e-6 * table.abs().max():
        raise ValueError("clean_cache['hook_embed'] holds vectors that are not rows of model.W_E (largest "
                         f"difference {float(miss):.3g}), so the clean tokens cannot be recovered from it: pass "
                         "clean_tokens= (the tokens the cache was made from)")
    return ids.reshape(shape)


def _check_cache(model: Any, tokens: torch.Tensor, clean_cache: Any, hooks: list[str]) -> None:
    """Fail early unless a run of ``tokens`` reproduces ``clean_cache`` at ``hooks``."""
    host = host_for(model)
    with torch.no_grad():
        _, acts = run(host, tokens, torch.ones_like(tokens, dtype=torch.bool), set(hooks))
    for hook in hooks:
        cached = _cached(clean_cache, hook, tuple(tokens.shape)).to(acts[hook].device, acts[hook].dtype)
        scale = float(acts[hook].abs().max()) or 1.0
        if cached.shape != acts[hook].shape or not torch.allclose(cached, acts[hook], rtol=1e-4, atol=1e-5 * scale):
            raise ValueError(f"clean_cache[{hook!r}] does not match this model's run of the clean tokens: make the "
                             "cache with this model (no hooks attached) from the clean prompts")


def _batch_metric(patching_metric: PatchingMetric, n: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """TransformerLens's batch metric as the engine's per-prompt metric: each of the ``n`` prompts
    gets 1/n of the batch value, so the per-prompt estimates add up to the batch's. Only valid on
    the whole batch in order (the first-order runs here, with ``batch_size=n``): it takes the pair
    indices to say that it is not a row-by-row metric, and never patches exactly."""
    def per_prompt(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        value = patching_metric(logits)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError("patching_metric must return one number for the whole batch, as a tensor computed from "
                            f"the logits (as transformer_lens.patching expects), got {type(value).__name__}"
                            f"{' of shape ' + str(tuple(value.shape)) if isinstance(value, torch.Tensor) else ''}")
        if logits.requires_grad and not value.requires_grad:
            raise TypeError("patching_metric's value does not depend differentiably on the logits (did it call "
                            ".item() or detach?); AtP needs its gradient")
        return (value.reshape(()) / n).expand(n)
    return per_prompt


def _estimate(model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: PatchingMetric,
              nodes: list[str | NodeAdapter], *, method: str, clean_tokens: torch.Tensor | None,
              progress: bool | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The metric of the unpatched corrupted run and, per node type in ``nodes``, the estimated
    change when one node is patched to its clean value, ``[n_layers, pos, *node]``."""
    if method not in SIGNED_METHODS:
        raise ValueError(f"method must be one of {SIGNED_METHODS} (a signed estimate of the patched metric), got "
                         f"{method!r}; GradDrop ('atp+gd', 'atp*') gives unsigned scores: use attribute() for those")
    tokens = _tokens(corrupted_tokens)
    shape = tuple(tokens.shape)
    adapters = [plugins.adapters()[n] if isinstance(n, str) else n for n in nodes]
    host = host_for(model)
    hooks = sorted({h for a in adapters for h in a.hooks(host)})
    missing = [h for h in hooks if not host.has_hook(h)]
    if missing:
        raise ValueError(f"the model has no hook(s) {missing[:5]} to patch (e.g. an attention-only model has no MLP)")
    tokens = tokens.to(host.device)
    if clean_tokens is None:
        clean = _clean_tokens_from_cache(model, clean_cache, shape).to(host.device)
    else:
        clean = _tokens(clean_tokens).to(host.device)
        if tuple(clean.shape) != shape:
            raise ValueError(f"clean_tokens has shape {tuple(clean.shape)}, corrupted_tokens {shape}; they must match")
    _check_cache(model, clean, clean_cache, hooks)
    n = shape[0]
    # the engine patches "corrupt" values into "clean" runs: here the corrupted run gets clean values
    result = attribute(model, tokens, clean, _batch_metric(patching_metric, n), nodes=adapters, method=method,
                       batch_size=n, progress=progress)
    engine = result.require_engine("the patching functions")
    base = engine.clean_metric(next(engine.pairs.batches(n))).sum()
    return base, [n * result.signed[a.name] for a in adapters]  # mean over prompts -> change of the batch metric


def _patcher(name: str, nodes: list[str | NodeAdapter], all_pos: bool, doc: str) -> Callable[..., torch.Tensor]:
    """One ``get_act_patch_*`` function: the estimates for ``nodes`` (stacked when several), summed
    over positions when ``all_pos``."""
    def get_act_patch(model: Any, corrupted_tokens: torch.Tensor, clean_cache: Any, patching_metric: PatchingMetric,
                      *, method: str = "atp+qk", clean_tokens: torch.Tensor | None = None,
                      progress: bool | None = None) -> torch.Tensor:
        base, effects = _estimate(model, corrupted_tokens, clean_cache, patching_metric, nodes, method=method,
                                  clean_tokens=clean_tokens, progress=progress)
        out = [base + (e.sum(1) if all_pos else e) for e in effects]
        return out[0] if len(out) == 1 else torch.stack(out)

    get_act_patch.__name__ = get_act_patch.__qualname__ = name
    get_act_patch.__doc__ = (
        f"{doc}\n\nAtP estimate of the metric of the corrupted run with each one patched to its clean value. "
        "Arguments and meaning as in transformer_lens.patching (see this module's docstring); ``method``: 'atp+qk' "
        "(default) or 'atp'; ``clean_tokens``: only where hook_embed is not W_E[tokens].")
    return get_act_patch


get_act_patch_resid_pre = _patcher(
    "get_act_patch_resid_pre", ["resid_pre"], False,
    "Residual stream at the start of each block, by position: [n_layers, pos].")
get_act_patch_resid_mid = _patcher(
    "get_act_patch_resid_mid", [RESID_MID], False,
    "Residual stream between attention and MLP, by position: [n_layers, pos].")
get_act_patch_attn_out = _patcher(
    "get_act_patch_attn_out", [ATTN_OUT], False,
    "Output of each attention layer, by position: [n_layers, pos].")
get_act_patch_mlp_out = _patcher(
    "get_act_patch_mlp_out", [MLP_OUT], False,
    "Output of each MLP layer, by position: [n_layers, pos].")
get_act_patch_attn_head_out_by_pos = _patcher(
    "get_act_patch_attn_head_out_by_pos", ["attn_z"], False,
    "Each head's output (z), by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_q_by_pos = _patcher(
    "get_act_patch_attn_head_q_by_pos", ["attn_q"], False,
    "Each head's query, by position: [n_layers, pos, n_heads].")
get_act_patch_attn_head_k_by_pos = _patcher(
    "get_act_patch_attn_head_k_by_pos", ["attn_k"], False,
    "Each kv-head's key, by position: [n_layers, pos, n_kv_heads].")
get_act_patch_attn_head_v_by_pos = _patcher(
    "get_act_patch_attn_head_v_by_pos", ["attn_v"], False,
    "Each kv-head's value, by position: [n_layers, pos, n_kv_heads].")
get_act_patch_attn_head_out_all_pos = _patcher(
    "get_act_patch_attn_head_out_all_pos", ["attn_z"], True,
    "Each head's output (z) at all positions at once: [n_layers, n_heads].")
get_act_patch_attn_head_q_all_pos = _patcher(
    "get_act_patch_attn_head_q_all_pos", ["attn_q"], True,
    "Each head's query at all positions at once: [n_layers, n_heads].")
get_act_patch_attn_head_k_all_pos = _patcher(
    "get_act_patch_attn_head_k_all_pos", ["attn_k"], True,
    "Each kv-head's key at all positions at once: [n_layers, n_kv_heads].")
get_act_patch_attn_head_v_all_pos = _patcher(
    "get_act_patch_attn_head_v_all_pos", ["attn_v"], True,
    "Each kv-head's value at all positions at once: [n_layers, n_kv_heads].")
get_act_patch_mlp_neurons_by_pos = _patcher(
    "get_act_patch_mlp_neurons_by_pos", ["mlp_neurons"], False,
    "Each MLP neuron (hook_post), by position: [n_layers, pos, d_mlp]. TransformerLens has no named function "
    "for neurons; its equivalent is generic_activation_patch(..., patch_setter=layer_pos_head_vector_patch_setter, "
    "activation_name='post', index_df=<every layer, pos, neuron>) reshaped to [n_layers, pos, d_mlp].")
get_act_patch_mlp_neurons_all_pos = _patcher(
    "get_act_patch_mlp_neurons_all_pos", ["mlp_neurons"], True,
    "Each MLP neuron (hook_post) at all positions at once: [n_layers, d_mlp].")
get_act_patch_block_every = _patcher(
    "get_act_patch_block_every", ["resid_pre", ATTN_OUT, MLP_OUT], False,
    "resid_pre, attn_out and mlp_out by position, stacked: [3, n_layers, pos].")

__all__ = [name for name in dir() if name.startswith("get_act_patch_")]

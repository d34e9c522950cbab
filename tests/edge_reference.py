"""Naive edge references written with TransformerLens hooks only (nothing from atp_plugin.edges).

A copy of the model gets TransformerLens's own per-head inputs and outputs switched on
(``use_split_qkv_input``: ``hook_q_input``/``hook_k_input``/``hook_v_input`` ``[batch, pos, head,
d_model]``; ``use_hook_mlp_in``: ``hook_mlp_in``; ``use_attn_result``: ``hook_result``, a head's
write without b_O). A receiver's gradient is then dL/d(its own input hook), a sender's write its
own hook's value, and patching one edge is one forward pass adding the sender's change to that
receiver's input hook alone.
"""

from __future__ import annotations

import copy

import torch
from transformer_lens import HookedTransformer


def split_model(model: HookedTransformer) -> HookedTransformer:
    ref = copy.deepcopy(model)
    ref.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:
        ref.set_use_hook_mlp_in(True)
    ref.set_use_attn_result(True)
    return ref


def kv_heads(model: HookedTransformer) -> int:
    return model.cfg.n_key_value_heads or model.cfg.n_heads


def edges(model: HookedTransformer) -> list[tuple[str, str, str, tuple]]:
    """(edge name, sender hook, receiver hook, receiver index) for every edge, enumerated by walking
    the layers and keeping the list of writers available so far."""
    cfg = model.cfg
    gqa = kv_heads(model) != cfg.n_heads
    available = [("embed", "hook_embed", ())]
    out = []
    for layer in range(cfg.n_layers):
        readers = [(f"L{layer}.H{h}.q", f"blocks.{layer}.hook_q_input", (h,)) for h in range(cfg.n_heads)]
        for which in "kv":
            readers += [(f"L{layer}.{'KV' if gqa else 'H'}{j}.{which}", f"blocks.{layer}.hook_{which}_input", (j,))
                        for j in range(kv_heads(model))]
        out += [(f"{w} -> {r}", wh, rh, ri) for r, rh, ri in readers for w, wh, _ in available]
        heads = [(f"L{layer}.H{h}", f"blocks.{layer}.attn.hook_result", (h,)) for h in range(cfg.n_heads)]
        if not cfg.attn_only:
            mlp_readers = available if cfg.parallel_attn_mlp else available + heads
            out += [(f"{w} -> mlp{layer}", wh, f"blocks.{layer}.hook_mlp_in", ()) for w, wh, _ in mlp_readers]
        available = available + heads
        if not cfg.attn_only:
            available = available + [(f"mlp{layer}", f"blocks.{layer}.hook_mlp_out", ())]
    out += [(f"{w} -> logits", wh, f"blocks.{cfg.n_layers - 1}.hook_resid_post", ()) for w, wh, _ in available]
    return out


def sender_value(cache: dict, hook: str, name: str) -> torch.Tensor:
    """A sender's write ``[batch, pos, d_model]`` from a cache of the split model (the embedding:
    token plus positional embedding where the model adds one)."""
    if hook.endswith("hook_result"):
        return cache[hook][:, :, int(name.split(" -> ")[0].split(".H")[1])]
    if hook == "hook_embed" and "hook_pos_embed" in cache:
        return cache[hook] + cache["hook_pos_embed"]
    return cache[hook]


def cached(model: HookedTransformer, tokens: torch.Tensor, hooks: set[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return dict(cache.items())


def eap(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> tuple[list[str], torch.Tensor]:
    """Edge names and Iatp per pair, edge and position ``[N, edges, T]``."""
    ref = split_model(model)
    es = edges(model)
    senders = {e[1] for e in es} | {"hook_pos_embed"}
    readers = {e[2] for e in es}
    noise, clean_acts = cached(ref, corrupt, senders), cached(ref, clean, senders)
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x
        return x

    with torch.enable_grad():
        logits = ref.run_with_hooks(clean, fwd_hooks=[(h, keep) for h in readers])
        grads = dict(zip(readers, torch.autograd.grad(metric(logits, torch.arange(len(clean))).sum(),
                                                      [acts[h] for h in readers])))
    out = []
    for name, wh, rh, ri in es:
        delta = sender_value(noise, wh, name) - sender_value(clean_acts, wh, name)  # [N, T, d]
        g = grads[rh][(slice(None), slice(None)) + ri]  # [N, T, d]
        out.append((delta * g).sum(-1))
    return [e[0] for e in es], torch.stack(out, 1)


def exact(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric, per_position: bool
          ) -> tuple[list[str], torch.Tensor]:
    """Edge names and the exact effect I per pair and edge (``[N, edges]``) or edge and position
    (``[N, edges, T]``): one forward pass per edge (and position) over all pairs."""
    ref = split_model(model)
    es = edges(model)
    senders = {e[1] for e in es} | {"hook_pos_embed"}
    noise, clean_acts = cached(ref, corrupt, senders), cached(ref, clean, senders)
    idx = torch.arange(len(clean))
    with torch.no_grad():
        base = metric(ref(clean), idx)
    t = clean.shape[1]
    out = []
    for name, wh, rh, ri in es:
        delta = sender_value(noise, wh, name) - sender_value(clean_acts, wh, name)
        row = []
        for pos in (range(t) if per_position else [None]):
            def add(x, hook, delta=delta, pos=pos, ri=ri):
                x = x.clone()
                at = (slice(None), slice(None) if pos is None else pos) + ri
                x[at] = x[at] + delta[:, slice(None) if pos is None else pos]
                return x
            with torch.no_grad():
                row.append(metric(ref.run_with_hooks(clean, fwd_hooks=[(rh, add)]), idx) - base)
        out.append(torch.stack(row, -1) if per_position else row[0])
    return [e[0] for e in es], torch.stack(out, 1)


def circuit_metric(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric,
                   kept: set[str], mean_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The metric per pair ``[N]`` with every edge not in ``kept`` (names) patched: each receiver's
    input hook gets, for each excluded sender, the sender's corrupt write (with ``mean_tokens``: its
    write averaged over those prompts, per position) minus its write live in this run (recorded as
    the writers fire, before any reader of theirs)."""
    ref = split_model(model)
    es = edges(model)
    senders = {e[1] for e in es} | {"hook_pos_embed"}
    if mean_tokens is None:
        noise = cached(ref, corrupt, senders)
    else:
        noise = {h: v.mean(0, keepdim=True) for h, v in cached(ref, mean_tokens, senders).items()}
    live: dict[str, torch.Tensor] = {}
    excluded: dict[tuple[str, tuple], list[tuple[str, str]]] = {}
    for name, wh, rh, ri in es:
        if name not in kept:
            excluded.setdefault((rh, ri), []).append((wh, name))

    def record(x, hook):
        live[hook.name] = x
        return x

    def reader(rh: str):
        def hook(x, hook):
            x = x.clone()
            for (h, ri), writers in excluded.items():
                if h != rh:
                    continue
                at = (slice(None), slice(None)) + ri
                for wh, name in writers:
                    x[at] = x[at] + sender_value(noise, wh, name) - sender_value(live, wh, name)
            return x
        return hook

    hooks = [(h, record) for h in senders if h in ref.hook_dict] + [(rh, reader(rh)) for rh in {k[0] for k in excluded}]
    with torch.no_grad():
        return metric(ref.run_with_hooks(clean, fwd_hooks=hooks), torch.arange(len(clean)))


def interpolated_grads(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric,
                       hooks: set[str], steps: int) -> dict[str, torch.Tensor]:
    """dL/d(hook value) averaged over the runs whose token embedding (``hook_embed``) is clean +
    (k/m)(noise - clean), k = 1..m."""
    noise_embed = cached(model, corrupt, {"hook_embed"})["hook_embed"]
    total: dict[str, torch.Tensor] = {}
    for k in range(1, steps + 1):
        acts: dict[str, torch.Tensor] = {}

        def keep(x, hook, acts=acts):
            acts[hook.name] = x
            return x

        def mix(x, hook, alpha=k / steps):
            return x + alpha * (noise_embed - x)

        with torch.enable_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=[("hook_embed", mix)] + [(h, keep) for h in hooks])
            value = metric(logits, torch.arange(len(clean))).sum()
            grads = torch.autograd.grad(value, [acts[h] for h in sorted(hooks)])
        for h, g in zip(sorted(hooks), grads):
            total[h] = total.get(h, 0) + g / steps
    return total


def eap_ig(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric, steps: int
           ) -> tuple[list[str], torch.Tensor]:
    """Edge names and Iig per pair, edge and position ``[N, edges, T]``."""
    split = split_model(model)
    es = edges(model)
    senders = {e[1] for e in es} | {"hook_pos_embed"}
    noise, clean_acts = cached(split, corrupt, senders), cached(split, clean, senders)
    grads = interpolated_grads(split, clean, corrupt, metric, {e[2] for e in es}, steps)
    out = []
    for name, wh, rh, ri in es:
        delta = sender_value(noise, wh, name) - sender_value(clean_acts, wh, name)
        out.append((delta * grads[rh][(slice(None), slice(None)) + ri]).sum(-1))
    return [e[0] for e in es], torch.stack(out, 1)


def qk_fixed(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric
             ) -> tuple[list[str], torch.Tensor]:
    """Names of the edges into queries and keys and their Iqk per pair and position ``[N, edges, T]``:
    for each edge and position one real forward pass (up to the receiver's layer) with the sender's
    change added to that q/k input alone, the new attention pattern read off, and sum (A' - A) G
    with G = dL/dA on the clean run."""
    split = split_model(model)
    es = [e for e in edges(model) if e[2].endswith(("hook_q_input", "hook_k_input"))]
    senders = {e[1] for e in es} | {"hook_pos_embed"}
    noise, clean_acts = cached(split, corrupt, senders), cached(split, clean, senders)
    patterns = {f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)}
    G = interpolated_grads(model, clean, clean, metric, patterns, steps=1)  # alpha = 1 of clean -> clean: the clean run
    A = cached(split, clean, patterns)
    t = clean.shape[1]
    out = []
    for name, wh, rh, ri in es:
        layer = int(rh.split(".")[1])
        pattern = f"blocks.{layer}.attn.hook_pattern"
        delta = sender_value(noise, wh, name) - sender_value(clean_acts, wh, name)
        row = []
        for pos in range(t):
            got: dict[str, torch.Tensor] = {}

            def add(x, hook, pos=pos, ri=ri, delta=delta):
                x = x.clone()
                x[(slice(None), pos) + ri] += delta[:, pos]
                return x

            def grab(x, hook, got=got):
                got["A"] = x

            with torch.no_grad():
                split.run_with_hooks(clean, fwd_hooks=[(rh, add), (pattern, grab)], stop_at_layer=layer + 1)
            row.append(((got["A"] - A[pattern]) * G[pattern]).sum((1, 2, 3)))
        out.append(torch.stack(row, -1))
    return [e[0] for e in es], torch.stack(out, 1)


def linear_model(make_model, n_layers: int = 3) -> HookedTransformer:
    """Attention-only, no LayerNorm, W_Q = W_K = 0: every pattern is the uniform causal one whatever
    the residual, so the model is affine in every residual read and a logit difference is too
    (``make_model``: conftest's random float64 model builder)."""
    model = make_model(4, n_layers=n_layers, attn_only=True, normalization_type=None)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.W_K.zero_()
    return model

"""Naive references on a TransformerBridge (TransformerLens 3 or 4), with its hooks and autograd only
(nothing from ``atp_plugin`` computes an expected value): node IG and exact node patching, and for
edges exact patching, EAP, EAP-IG and the edge QK fix; and ``check``, which runs one method on a
model and compares it with its reference (the ``tests/test_architectures.py`` matrix and
``scripts/architecture_table.py`` share it).

Edges (``atp_plugin.edges.graph``): a sender's change is its write on the corrupt prompt less its
write on the clean one: the embedding's at ``blocks.0.hook_resid_pre``, a head's as the change of
``hook_attn_out`` when that head's ``hook_z`` alone takes its corrupt value (for the first-order
methods its derivative along that change: they differ behind a post-norm), an MLP's at
``hook_mlp_out``. A receiver reads the residual plus that change and nothing else does: an MLP
through ``ln2.hook_in``, the logits through ``ln_final.hook_in``, a head's q/k/v by a first run with
``ln1.hook_in`` changed, whose ``hook_q/k/v`` value for that head alone then replaces the clean one
in a second run. Exact patching is that run's metric less the clean one; EAP the derivative of it
along the change (a per-pair scalar times the change, by autograd); EAP-IG that derivative averaged
over runs whose embedding is clean + (k/m)(corrupt - clean), k = 1..m; the QK fix patches the
receiving q (k) at one position at a time, reads the model's own attention pattern and dots its
change with dL/dpattern, summed over positions.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from atp_plugin import attribute
from atp_plugin.edges import attribute_edges
from atp_plugin.errors import AtpError
from helpers import reference

NODES = ["attn_q", "attn_k"]
NODE_METHODS = ["atp", "atp+qk", "atp*", "ig", "ap"]
EDGE_METHODS = ["atp", "atp+qk", "ig", "ap"]
STEPS = 2  # IG steps, node and edge
EMBED = "blocks.0.hook_resid_pre"
Hooks = list[tuple[str, Callable]]


def _run(model: Any, tokens: torch.Tensor, hooks: Hooks, names: list[str] = ()) -> tuple[torch.Tensor, dict]:
    """Logits of ``tokens`` run with ``hooks`` and the values at ``names`` (with their graph)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(x, hook):
            acts[name] = x
            return x
        return hook

    return model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, keep(n)) for n in names]), acts


def _set(value: torch.Tensor) -> Callable:
    return lambda x, hook: value


def _embedding(clean_embed: torch.Tensor, noise_embed: torch.Tensor, alpha: float | None) -> Hooks:
    return [] if alpha is None else [(EMBED, _set(clean_embed + alpha * (noise_embed - clean_embed)))]


# --- nodes (attn_q, attn_k: [n_layers, pos, heads of the node type]) --------------------------------

def _q_k(layer: int) -> dict[str, str]:
    return {nt: f"blocks.{layer}.attn.hook_{nt[-1]}" for nt in NODES}


def node_ig(model: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric, steps: int = STEPS) -> dict:
    """Signed Iig per node type, mean over pairs: (corrupt - clean) . the mean gradient along the path."""
    names = [h for layer in range(model.cfg.n_layers) for h in _q_k(layer).values()]
    with torch.no_grad():
        _, c = _run(model, clean, [], names + [EMBED])
        _, n = _run(model, corrupt, [], names + [EMBED])
    total = {h: torch.zeros_like(c[h]) for h in names}
    for k in range(1, steps + 1):
        with torch.enable_grad():
            logits, acts = _run(model, clean, _embedding(c[EMBED], n[EMBED], k / steps), names)
            grads = torch.autograd.grad(metric(logits).sum(), [acts[h] for h in names])
        for h, g in zip(names, grads):
            total[h] += g / steps
    return {nt: torch.stack([((n[h] - c[h]) * total[h]).sum(-1).mean(0) for h in
                             (_q_k(layer)[nt] for layer in range(model.cfg.n_layers))]) for nt in NODES}


def node_ap(model: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> dict:
    """Signed exact effect per node type, mean over pairs: one run per (layer, position, head)."""
    out = {}
    with torch.no_grad():
        base = metric(model(clean))
        for nt in NODES:
            per_layer = []
            for layer in range(model.cfg.n_layers):
                h = _q_k(layer)[nt]
                _, n = _run(model, corrupt, [], [h])
                eff = torch.zeros(n[h].shape[1:3], dtype=torch.float64)
                for pos in range(n[h].shape[1]):
                    for head in range(n[h].shape[2]):
                        def patch(x, hook, pos=pos, head=head, v=n[h]):
                            x = x.clone()
                            x[:, pos, head] = v[:, pos, head]
                            return x
                        eff[pos, head] = (metric(model.run_with_hooks(clean, fwd_hooks=[(h, patch)])) - base).mean()
                per_layer.append(eff)
            out[nt] = torch.stack(per_layer)
    return out


# --- edges ----------------------------------------------------------------------------------------

def sender_changes(model: Any, graph: Any, clean: torch.Tensor, corrupt: torch.Tensor, first_order: bool = False,
                   dicts: tuple = ()) -> list[torch.Tensor]:
    """Each sender's change ``[batch, pos, d_model]``, in ``graph.senders`` order; with
    ``first_order``, a head's is the derivative of ``hook_attn_out`` along its z's change (by a
    double backward), which differs from the change itself only behind a post-norm. ``dicts``:
    the dictionaries (``feature_reference.Dict``) whose nodes are senders."""
    layers = range(model.cfg.n_layers)
    names = [EMBED] + [f"blocks.{ly}.{h}" for ly in layers for h in ("attn.hook_z", "hook_attn_out", "hook_mlp_out")]
    names += [h for d in dicts for h in (d.hook_in, d.hook)]
    with torch.no_grad():
        _, c = _run(model, clean, [], names)
        _, n = _run(model, corrupt, [], names)
        nodes_c = {k: v for d in dicts for k, v in d.nodes(c[d.hook_in], c[d.hook]).items()}
        nodes_n = {k: v for d in dicts for k, v in d.nodes(n[d.hook_in], n[d.hook]).items()}
        out = []
        for s in graph.senders:
            if s.name in nodes_c:  # a dictionary's node: its write's change (linear in the features)
                out.append(nodes_n[s.name] - nodes_c[s.name])
            elif s.kind == "embed":
                out.append(n[EMBED] - c[EMBED])
            elif s.kind == "mlp":
                out.append(n[f"blocks.{s.layer}.hook_mlp_out"] - c[f"blocks.{s.layer}.hook_mlp_out"])
            else:
                z = f"blocks.{s.layer}.attn.hook_z"

                out_hook = f"blocks.{s.layer}.hook_attn_out"
                with torch.enable_grad():
                    eps = torch.tensor(0.0 if first_order else 1.0, dtype=c[z].dtype, requires_grad=first_order)

                    def patch(x, hook, head=s.head, v=n[z], eps=eps):
                        x = x.clone()
                        x[:, :, head] = x[:, :, head] + eps * (v[:, :, head] - x[:, :, head])
                        return x
                    _, p = _run(model, clean, [(z, patch)], [out_hook])
                    if first_order:
                        y = p[out_hook]
                        u = torch.zeros_like(y, requires_grad=True)
                        (g,) = torch.autograd.grad(y, eps, u, create_graph=True)
                        (jvp,) = torch.autograd.grad(g, u)
                        out.append(jvp.detach())
                    else:
                        out.append(p[out_hook].detach() - c[out_hook])
    return out


def _mlp_input(model: Any, layer: int) -> str:
    """The hook of the residual stream a layer's MLP reads (in a parallel block, the layer's input)."""
    return f"blocks.{layer}.hook_resid_{'pre' if getattr(model.cfg, 'parallel_attn_mlp', False) else 'mid'}"


def _read(model: Any, tokens: torch.Tensor, receiver: Any, delta: torch.Tensor, path: Hooks,
          pos: int | None = None, dicts: tuple = ()) -> Hooks:
    """Hooks that make ``receiver`` alone read the residual plus ``delta`` (at ``pos`` only, for q/k).
    A node of a dictionary at an MLP (``dicts``): the MLP's output with the residual it reads
    changed, the node's write recomputed from it, and only that write's change added at the
    dictionary's hook."""
    add = lambda x, hook: x + delta  # noqa: E731
    if receiver.kind == "logits":  # only the logits read the last residual
        return [(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", add)]
    block = f"blocks.{receiver.layer}"
    if receiver.kind in ("feature", "error", "rest"):
        d = next(d for d in dicts if receiver.name in d.names())
        hooks = list(dict.fromkeys([d.hook_in, d.hook]))
        _, moved = _run(model, tokens, path + [(_mlp_input(model, d.layer), add)], hooks)
        _, still = _run(model, tokens, path, hooks)
        change = (d.nodes(moved[d.hook_in], moved[d.hook])[receiver.name]
                  - d.nodes(still[d.hook_in], still[d.hook])[receiver.name])
        return [(d.hook, lambda x, hook: x + change)]
    if receiver.kind == "mlp":
        if f"{block}.ln2.hook_in" in model.hook_dict:
            return [(f"{block}.ln2.hook_in", add)]
        # no pre-norm (OLMo 2): the MLP's output with the whole residual it reads changed, then alone
        _, acts = _run(model, tokens, path + [(f"{block}.hook_resid_mid", add)], [f"{block}.hook_mlp_out"])
        new_out = acts[f"{block}.hook_mlp_out"]
        return [(f"{block}.hook_mlp_out", lambda x, hook: new_out)]
    hook = f"{block}.attn.hook_{receiver.kind}"
    read = f"{block}.ln1.hook_in" if f"{block}.ln1.hook_in" in model.hook_dict else f"{block}.hook_resid_pre"
    _, acts = _run(model, tokens, path + [(read, add)], [hook])
    new = acts[hook]
    where = torch.zeros(new.shape[1:3], dtype=torch.bool)
    where[slice(None) if pos is None else pos, receiver.head] = True
    return [(hook, lambda x, hook: torch.where(where[None, :, :, None], new, x))]


def edges(model: Any, graph: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric, method: str,
          steps: int = STEPS, dicts: tuple = ()) -> torch.Tensor:
    """Signed I of every edge of ``graph`` (each patched at every position), mean over pairs: ``[edge]``.
    ``metric(logits, pair indices) -> [batch]``. The edges into one receiver run as copies of the
    batch, one per sender. ``dicts``: the graph's dictionaries (``feature_reference.Dict``)."""
    # [senders, batch, pos, d_model]
    changes = torch.stack(sender_changes(model, graph, clean, corrupt, first_order=method != "ap", dicts=dicts))
    n = clean.shape[0]
    with torch.no_grad():
        _, ends = _run(model, clean, [], [EMBED])
        _, noise = _run(model, corrupt, [], [EMBED])
        base = metric(model(clean), torch.arange(n))
    patterns = [f"blocks.{ly}.attn.hook_pattern" for ly in range(model.cfg.n_layers)]
    with torch.enable_grad():
        logits, acts = _run(model, clean, [], patterns)
        G = dict(zip(patterns, torch.autograd.grad(metric(logits, torch.arange(n)).sum(),
                                                   [acts[p] for p in patterns])))
    out = torch.zeros(graph.n_edges, dtype=torch.float64)
    for r, receiver in enumerate(graph.receivers):
        first = int(graph.receiver_start[r])
        n_s = int((graph.receiver_index == r).sum())
        senders = graph.sender_index[first:first + n_s]
        tokens, idx = clean.repeat(n_s, 1), torch.arange(n).repeat(n_s)  # copy s * n + i: sender s, pair i
        delta = changes[senders].flatten(0, 1)  # [senders * batch, pos, d_model]
        per_copy = torch.zeros(n_s * n, dtype=torch.float64)
        if method == "ap":
            with torch.no_grad():
                per_copy = metric(model.run_with_hooks(tokens, fwd_hooks=_read(model, tokens, receiver, delta, [],
                                                                                 dicts=dicts)),
                                  idx) - base.repeat(n_s)
        elif method == "atp+qk" and receiver.kind in "qk":
            pattern = patterns[receiver.layer]
            g, a = G[pattern].repeat(n_s, 1, 1, 1), acts[pattern].detach().repeat(n_s, 1, 1, 1)
            with torch.no_grad():
                for pos in range(clean.shape[1]):
                    _, p = _run(model, tokens, _read(model, tokens, receiver, delta, [], pos), [pattern])
                    per_copy += ((p[pattern] - a) * g).sum((1, 2, 3))
        else:  # the derivative along the change at the clean run (atp, atp+qk) or along the path (ig)
            alphas = [None] if method in ("atp", "atp+qk") else [k / steps for k in range(1, steps + 1)]
            for alpha in alphas:
                path = _embedding(ends[EMBED].repeat(n_s, 1, 1), noise[EMBED].repeat(n_s, 1, 1), alpha)
                with torch.enable_grad():
                    eps = torch.zeros(n_s * n, 1, 1, dtype=delta.dtype, requires_grad=True)
                    hooks = _read(model, tokens, receiver, eps * delta, path, dicts=dicts)
                    logits = model.run_with_hooks(tokens, fwd_hooks=path + hooks)
                    (grad,) = torch.autograd.grad(metric(logits, idx).sum(), eps)
                per_copy += grad.flatten() / len(alphas)
        out[first:first + n_s] = per_copy.view(n_s, n).mean(1)
    return out


# --- SAE features ---------------------------------------------------------------------------------

FEATURE_HOOK, KEPT = "blocks.0.hook_mlp_out", [1, 4, 9]


def dictionary(model: Any) -> tuple[Any, Any]:
    """A random float64 SAE on layer 0's MLP output: the library's adapter and the reference's
    ``feature_reference.Dict`` of it (features ``KEPT`` kept in edge graphs)."""
    from atp_plugin.adapters import SAEFeatures
    from feature_reference import Dict
    from helpers import random_simple_sae

    sae = random_simple_sae(7, FEATURE_HOOK, d=model.cfg.d_model)
    return SAEFeatures(sae), Dict("mlp", 0, sae, FEATURE_HOOK, FEATURE_HOOK, KEPT)


def node_features(model: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric, sae: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed AtP of every feature ``[pos, d_sae]`` and of the error node ``[pos]``, mean over pairs:
    the site's value is decode(f) + e with f = encode(site) and e the error, both leaves, so their
    gradients are the model's own; each node's change is its corrupt value less its clean one."""
    with torch.no_grad():
        _, n = _run(model, corrupt, [], [FEATURE_HOOK])
    f_n = sae.encode(n[FEATURE_HOOK])
    e_n = n[FEATURE_HOOK] - sae.decode(f_n)
    leaves: dict[str, torch.Tensor] = {}

    def splice(a, hook):
        leaves["f"] = sae.encode(a).detach().requires_grad_(True)
        leaves["e"] = (a - sae.decode(leaves["f"])).detach().requires_grad_(True)
        return sae.decode(leaves["f"]) + leaves["e"]

    with torch.enable_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=[(FEATURE_HOOK, splice)])
        g_f, g_e = torch.autograd.grad(metric(logits, torch.arange(len(clean))).sum(), [leaves["f"], leaves["e"]])
    f_c, e_c = leaves["f"].detach(), leaves["e"].detach()
    return ((f_n - f_c) * g_f).mean(0), ((e_n - e_c) * g_e).sum(-1).mean(0)


# --- one cell of the matrix -----------------------------------------------------------------------

def check(model: Any, kind: str, method: str, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> float | str:
    """Run ``method`` (``kind`` "node" on attn_q/attn_k nodes, "edge", "sae node" on the features of
    ``dictionary``'s SAE or "sae edge" on the edge graph with its features ``KEPT``) on ``model`` in
    float64 and compare it with its reference (``metric(logits, pair indices)``, as ``metrics``
    builds them): the largest difference relative to the reference's largest value, or the
    refusal's message where the library refuses with an ``AtpError``. Any other exception propagates."""
    adapter, d = dictionary(model) if kind.startswith("sae") else (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-layers GradDrop warning
        try:
            if kind == "node":
                got = attribute(model, clean, corrupt, metric, nodes=NODES, method=method, progress=False,
                                **({"ig_steps": STEPS} if method == "ig" else {}))
            elif kind == "sae node":
                got = attribute(model, clean, corrupt, metric, nodes=[adapter], method=method, progress=False)
            else:
                features = {"features": [adapter], "keep": {adapter.name: KEPT}} if adapter is not None else {}
                res = attribute_edges(model, clean, corrupt, metric, method=method, ig_steps=STEPS, **features)
        except AtpError as err:
            return str(err).splitlines()[0]
    bound = lambda logits: metric(logits, torch.arange(logits.shape[0]))  # noqa: E731  # logits -> [batch]
    if kind in ("edge", "sae edge"):
        dicts = (d,) if d is not None else ()
        want, have = edges(model, res.graph, clean, corrupt, metric, method, dicts=dicts), res.signed
        return float((have - want).abs().max()) / float(want.abs().max())
    if kind == "sae node":
        assert method == "atp", method
        pairs = list(zip((got.signed[adapter.name], got.signed[adapter.name + ".error"]),
                         node_features(model, clean, corrupt, metric, d.sae)))
        return max(float((a - b).abs().max()) / float(b.abs().max()) for a, b in pairs)
    if method in ("ig", "ap"):
        want = (node_ig if method == "ig" else node_ap)(model, clean, corrupt, bound)
        pairs = [(got.signed[nt], want[nt]) for nt in NODES]
    else:
        want = reference(model, clean, corrupt, metric)[method][0]
        pairs = [(got.scores[nt], want[nt]) for nt in NODES]
    return max(float((a - b).abs().max()) / float(b.abs().max()) for a, b in pairs)

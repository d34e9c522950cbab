"""Per-pair first-order estimates for one batch of pairs: AtP, the QK fix, and GradDrop.

One noise run (no grad), one clean forward, one backward of the summed metric (pairs are
independent, so it gives every pair's gradient), then, for GradDrop, one partial backward per
layer through the layers below its cut, all on the same forward graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..hosts import Host, SitePosition
from . import qk as qkfix
from .runs import run

if TYPE_CHECKING:  # annotations only: the engine does not import the adapters package at run time
    from ..adapters import NodeAdapter


@dataclass(frozen=True)
class Site:
    """One hook an adapter reads, where it sits, and its index in the adapter's score tensor.

    ``reads``: further hooks whose values the adapter's nodes are computed from (an adapter's
    optional ``reads(hook)``, e.g. a transcoder's input hook); they carry no gradient and are
    never patched, and must run before ``hook`` in the forward pass.
    """

    adapter: NodeAdapter
    hook: str
    index: int
    pos: SitePosition
    qk_fixed: bool
    reads: tuple[str, ...] = ()

    @property
    def needs(self) -> tuple[str, ...]:
        """Every hook whose value the adapter's methods take for this site."""
        return (self.hook, *self.reads)

    def value(self, values: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the adapter's ``encode``/``pullback``/``patch`` take as the site value: the hook's
        value, or for an adapter with ``reads`` a dict hook -> value over ``needs``."""
        return {h: values[h] for h in self.needs} if self.reads else values[self.hook]


def sites_of(host: Host, adapters: list[NodeAdapter], qk: bool) -> list[Site]:
    """Every (adapter, hook) pair, with its position relative to the residual stream.

    A site's position is its written hook's: an adapter's nodes change the model only there, so
    GradDrop treats them as part of that hook's layer wherever their ``reads`` sit.
    """
    sites: list[Site] = []
    for a in adapters:
        for i, h in enumerate(a.hooks(host)):
            reads = tuple(a.reads(h)) if hasattr(a, "reads") else ()
            sites.append(Site(a, h, i, host.site_position(h), bool(qk and a.qk), reads))
    return sites


def check_order(sites: list[Site], acts: dict[str, torch.Tensor]) -> None:
    """Fail unless every site's ``reads`` fired before its hook; ``acts`` holds values in firing order.

    A node computed from a hook that runs after the node's own write would change when it is
    patched: no exact patch or first-order estimate is defined for it.
    """
    order = {h: i for i, h in enumerate(acts)}
    for s in sites:
        late = [r for r in s.reads if order[r] > order[s.hook]]
        if late:
            raise ValueError(f"{getattr(s.adapter, 'name', s.adapter)}: its nodes are written at {s.hook!r} but read "
                             f"{late}, which the model runs later; an adapter can only read hooks that run before "
                             "the hook it writes")


def _masked(est: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Estimates ``[batch, pos, *node]`` with padding positions (``mask`` ``[batch, pos]`` False) set to 0."""
    if bool(mask.all()):
        return est
    return {grp: v * mask.reshape(mask.shape + (1,) * (v.ndim - 2)).to(v.dtype) for grp, v in est.items()}


def _dot(delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """delta . grad over the last axis (a node's vector); scalar nodes (axis of size 1) skip the reduction."""
    prod = delta * grad
    return prod.squeeze(-1) if prod.shape[-1] == 1 else prod.sum(-1)


def estimate_batch(host: Host, sites: list[Site], tokens: torch.Tensor, corrupt: torch.Tensor,
                   mask: torch.Tensor, metric, *, graddrop: bool, acc: torch.dtype
                   ) -> tuple[dict[tuple[int, str], torch.Tensor], dict[tuple[int, str], torch.Tensor] | None]:
    """Per-pair estimates for one batch.

    Returns ``(first, gd)`` keyed by ``(site number, group)``: ``first`` the AtP estimate (the
    QK-fix estimate for q/k sites when fixed) ``[batch, pos, *node]``; ``gd`` the GradDrop sum
    ``sum_l |I_l|`` (None without GradDrop). Padding positions are 0.
    """
    geoms = {s.pos.layer: host.attention(s.pos.layer) for s in sites if s.qk_fixed}
    site_hooks = {h for s in sites for h in s.needs}
    qk_hooks = {h for g in geoms.values() for h in (g.q_hook, g.k_hook)}
    with torch.no_grad():
        _, noise = run(host, corrupt, mask, site_hooks | qk_hooks)

    resid = [host.resid_hooks(layer) for layer in range(host.n_layers)] if graddrop else []
    capture = site_hooks | qk_hooks | {h for g in geoms.values() for h in (g.scores_hook, g.pattern_hook)}
    capture |= {h for pair in resid for h in pair}
    with torch.enable_grad():
        logits, clean = run(host, tokens, mask, capture)
        check_order(sites, clean)
        values = metric(logits)
        targets = sorted({s.hook for s in sites if not s.qk_fixed} | {g.pattern_hook for g in geoms.values()}
                         | {post for _, post in resid})
        grads = _grad(values.sum(), {h: clean[h] for h in targets}, None, retain=graddrop)
    full = dict(zip(targets, grads))

    with torch.no_grad():
        # what the QK fix needs besides G, per layer: A' - A [batch, head, t, s] for queries
        q_fixes: dict[int, torch.Tensor] = {}
        k_fixes: dict[int, qkfix.KeyFix] = {}
        for s in sites:
            if s.qk_fixed and s.pos.layer not in (q_fixes if s.adapter.qk == "q" else k_fixes):
                g = geoms[s.pos.layer]
                sc, q, k = (clean[h].detach().to(acc) for h in (g.scores_hook, g.q_hook, g.k_hook))
                if s.adapter.qk == "q":
                    q_fixes[s.pos.layer] = qkfix.query_delta(sc, q, noise[g.q_hook].to(acc), k, g)
                else:
                    A = clean[g.pattern_hook].detach().to(acc)
                    k_fixes[s.pos.layer] = qkfix.key_fix(sc, A, q, k, noise[g.k_hook].to(acc), g)
        fixed = {h: v.detach() for h, v in clean.items()}  # clean site values, no graph
        deltas = {}
        for n, s in enumerate(sites):
            if not s.qk_fixed:
                enc_n, enc_c = s.adapter.encode(s.hook, s.value(noise)), s.adapter.encode(s.hook, s.value(fixed))
                deltas[n] = {grp: (enc_n[grp] - enc_c[grp]).to(acc) for grp in enc_c}

        def estimate(n: int, grad_of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            s = sites[n]
            if s.qk_fixed:
                g = geoms[s.pos.layer]
                G = grad_of[g.pattern_hook].to(acc)
                if s.adapter.qk == "q":
                    out = {"": qkfix.query_effect(q_fixes[s.pos.layer], G)}
                else:
                    out = {"": qkfix.key_effect(k_fixes[s.pos.layer], G, g.group)}
            else:
                pulled = s.adapter.pullback(s.hook, s.value(fixed), grad_of[s.hook])
                out = {grp: _dot(deltas[n][grp], pulled[grp].to(acc)) for grp in pulled}
            return out  # padding positions are zeroed once, at the end

        first = {n: _masked(estimate(n, full), mask) for n in range(len(sites))}
    if not graddrop:
        return _flat(first), None

    # every cut below a node's layer leaves its gradient unchanged: I_l = Iatp for those l
    gd = {n: {grp: v.abs() * sites[n].pos.layer for grp, v in est.items()} for n, est in first.items()}
    for layer in range(host.n_layers):
        pre, post = resid[layer]
        below = [n for n, s in enumerate(sites) if s.pos.layer < layer]
        needed = sorted({geoms[sites[n].pos.layer].pattern_hook if sites[n].qk_fixed else sites[n].hook for n in below})
        with torch.enable_grad():
            cut = _grad(clean[pre], {h: clean[h] for h in needed}, full[post], retain=True) if needed else []
        with torch.no_grad():
            variant = dict(zip(needed, cut))
            for n, s in enumerate(sites):
                if s.pos.layer > layer:
                    continue  # counted in gd's initial value
                elif s.pos.layer == layer and not s.pos.on_resid:
                    continue  # I_l = 0: the node's only path out is the write that was cut
                elif s.pos.layer == layer:
                    est = estimate(n, {s.hook: full[post]})
                else:
                    est = estimate(n, variant)
                for grp, v in est.items():
                    gd[n][grp] += v.abs()
    return _flat(first), _flat({n: _masked(est, mask) for n, est in gd.items()})


def _grad(output: torch.Tensor, inputs: dict[str, torch.Tensor], grad_output: torch.Tensor | None,
          retain: bool) -> list[torch.Tensor]:
    """Gradients of ``output`` at the captured site values ``inputs`` (hook name -> tensor).

    Every site lies upstream of the logits, so a missing gradient means the model computed its
    output from something other than the tensor the hook returned (a hook point whose return
    value is ignored, a detach or no_grad in between): an error, never zeros that would pass for
    "no effect".
    """
    grads = torch.autograd.grad(output, list(inputs.values()), grad_outputs=grad_output, retain_graph=retain,
                                allow_unused=True)
    dead = [h for h, g in zip(inputs, grads) if g is None]
    if dead:
        raise RuntimeError(
            f"the metric's gradient does not reach hook(s) {dead[:5]}: the model does not use what the hook returns "
            "downstream, or something detaches in between (a hook returning x.detach(), a no_grad block), so AtP "
            "cannot estimate effects there; remove the detaching hook or choose other node types")
    return list(grads)


def _flat(per_site: dict[int, dict[str, torch.Tensor]]) -> dict[tuple[int, str], torch.Tensor]:
    return {(n, grp): v for n, groups in per_site.items() for grp, v in groups.items()}

"""Per-pair first-order estimates for one batch of pairs: AtP, the QK fix, and GradDrop.

One noise run (no grad), one clean forward, one backward of the summed metric (pairs are
independent, so it gives every pair's gradient), then, for GradDrop, one partial backward per
layer through the layers below its cut, all on the same forward graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..errors import UnsupportedModelError
from ..hosts import Host, SitePosition, rounding
from . import qk as qkfix
from .runs import run

# From BLOCKED_FROM tokens on, the QK fix runs over a layer's query rows in ROW_BLOCKS blocks, each
# on the keys its rows see (a causal model's blocks cover about its triangle): its temporaries are
# 1/8 of [batch, head, t, s], and the ops are the same at every such length (estimate() relies on
# this: it probes at BLOCKED_FROM tokens and more). Shorter prompts take one block (less overhead).
ROW_BLOCKS = 8
BLOCKED_FROM = 32

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
    batch = _Batch(host, sites, tokens, corrupt, mask, graddrop, acc)
    try:
        first = batch.first_order(metric)
        gd = batch.graddrop(first) if graddrop else None
    finally:
        batch.release()
    if gd is None:
        return _flat({n: _masked(est, mask) for n, est in first.items()}), None
    return _flat({n: _masked(est, mask) for n, est in first.items()}), _flat({n: _masked(est, mask)
                                                                          for n, est in gd.items()})


Sink = Callable[[int, dict[str, torch.Tensor]], None]


class _Batch:
    """One batch's runs and estimates, in named steps: the noise run, the clean run with its graph,
    the first-order pass (one backward), and GradDrop's partial backward passes.

    The QK fix holds no ``[batch, head, t, s]`` tensor per layer beyond what the forward graph
    keeps: the forward pass keeps only which scores are masked, and each layer's fix is computed
    (its scores recomputed from q and k), a block of query rows at a time, when the gradient at its
    attention pattern arrives during the backward pass (a tensor hook), used and dropped. GradDrop's
    variants need every layer's fix again, so with GradDrop each is kept in its factored form
    (``qk.KeptFix``: one ``[batch, head, t, s]`` tensor, the key coefficients, on the keys each
    block sees; recomputing the fixes per variant doubled atp*'s time), and the variants read dL/dz
    as well as dL/dA.
    """

    def __init__(self, host: Host, sites: list[Site], tokens: torch.Tensor, corrupt: torch.Tensor,
                 mask: torch.Tensor, graddrop: bool, acc: torch.dtype):
        self.host, self.sites, self.acc = host, sites, acc
        self.geoms = {s.pos.layer: host.attention(s.pos.layer) for s in sites if s.qk_fixed}
        site_hooks = {h for s in sites for h in s.needs}
        qk_hooks = {h for g in self.geoms.values() for h in g.reads}  # q, k (and what rotates them)
        with torch.no_grad():
            _, self.noise = run(host, corrupt, mask, site_hooks | qk_hooks)
        self.resid = [host.resid_hooks(layer) for layer in range(host.n_layers)] if graddrop else []
        capture = site_hooks | qk_hooks | {g.pattern_hook for g in self.geoms.values()}
        if graddrop:  # the kept fixes are factored through v and dL/dz
            capture |= {h for g in self.geoms.values() for h in (g.v_hook, g.z_hook)}
        capture |= {h for pair in self.resid for h in pair}
        self.tokens, self.mask, self.capture = tokens, mask, capture
        self.sink: Sink = lambda n, est: None  # where the QK hooks put their estimates (set per pass)
        self.kept: dict[int, list[tuple[slice, int, qkfix.KeptFix]]] | None = (
            {} if graddrop else None)  # layer -> per block of rows (rows, keys seen, its kept fix)
        self.grad_z: dict[int, torch.Tensor] = {}  # layer -> dL/dz of the pass under way (GradDrop)
        self.seen: dict[int, torch.Tensor] = {}  # layer -> which scores are not masked, until its fix is computed
        self.handles: list = []

    def release(self) -> None:
        """Remove the pattern hooks (they hold this batch and, through it, the model)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _plain(self, n: int) -> bool:
        return not self.sites[n].qk_fixed

    def first_order(self, metric) -> dict[int, dict[str, torch.Tensor]]:
        """The clean run and one backward: every site's AtP (QK-fixed) estimate."""
        with torch.enable_grad():
            observe = {g.scores_hook: self._observer(layer) for layer, g in self.geoms.items()}
            logits, self.clean = run(self.host, self.tokens, self.mask, self.capture, observe)
            check_order(self.sites, self.clean)
            for layer, g in self.geoms.items():
                self.handles.append(self.clean[g.pattern_hook].register_hook(
                    lambda G, layer=layer: self._on_pattern(layer, G)))
                if self.kept is not None:  # dL/dz arrives before dL/dA
                    self.handles.append(self.clean[g.z_hook].register_hook(
                        lambda gz, layer=layer: self.grad_z.__setitem__(layer, gz)))
            values = metric(logits)
            targets = sorted({s.hook for s in self.sites if not s.qk_fixed} | {post for _, post in self.resid}
                             | {g.q_hook for g in self.geoms.values()})  # q: makes the pattern's gradient flow
            first: dict[int, dict[str, torch.Tensor]] = {}
            self.sink = first.__setitem__
            grads = _grad(values.sum(), {h: self.clean[h] for h in targets}, None, retain=bool(self.resid))
        self.full = dict(zip(targets, grads))
        # what GradDrop still needs: the gradients after each layer, not those at the sites
        posts = {post for _, post in self.resid}
        with torch.no_grad():
            self.fixed = {h: v.detach() for h, v in self.clean.items()}  # clean site values, no graph
            self.deltas = {}
            for n, s in enumerate(self.sites):
                if self._plain(n):
                    enc_n = s.adapter.encode(s.hook, s.value(self.noise))
                    enc_c = s.adapter.encode(s.hook, s.value(self.fixed))
                    self.deltas[n] = {grp: (enc_n[grp] - enc_c[grp]).to(self.acc) for grp in enc_c}
            self.noise = {}  # every use is behind: the deltas above, the QK fixes in the backward
            for n in range(len(self.sites)):
                if self._plain(n):
                    first[n] = self._plain_estimate(n, self.full)
        self.full = {h: v for h, v in self.full.items() if h in posts}
        return {n: first[n] for n in range(len(self.sites))}  # in site order (the QK hooks filled theirs first)

    def _plain_estimate(self, n: int, grad_of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """AtP of site ``n`` (not QK-fixed) with the gradients ``grad_of``: delta . pullback(grad)."""
        s = self.sites[n]
        pulled = s.adapter.pullback(s.hook, s.value(self.fixed), grad_of[s.hook])
        return {grp: _dot(self.deltas[n][grp], pulled[grp].to(self.acc)) for grp in pulled}

    def _on_pattern(self, layer: int, G: torch.Tensor) -> None:
        """The QK-fix estimates of layer ``layer``'s q/k sites from G = dL/dA ``[batch, head, t, s]``,
        passed to the current sink: from the clean run the first time, from the kept fix after."""
        g, acc = self.geoms[layer], self.acc
        q_rows: list[torch.Tensor] = []  # per block of rows, [batch, rows, head]
        per_key = torch.zeros(G.shape[0], G.shape[3], G.shape[1] // g.group, dtype=acc, device=G.device)
        with torch.no_grad():
            if self.kept is not None and layer in self.kept:
                gz, z = self.grad_z.pop(layer).to(acc), self.clean[g.z_hook].detach()
                for rows, keys, kept in self.kept[layer]:
                    if kept.delta_v is not None:
                        q_rows.append(qkfix.kept_query_effect(kept, gz[:, rows]))
                    if kept.coeff is not None:
                        per_key[:, :keys] += qkfix.kept_key_effect(kept, G[:, :, rows, :keys].to(acc), gz[:, rows],
                                                                   z[:, rows].to(acc), g.group)
            else:
                self.grad_z.pop(layer, None)
                for rows, keys, fix in self._fixes(layer):
                    Gb = G[:, :, rows, :keys].to(acc)
                    if fix.delta is not None:
                        q_rows.append(qkfix.query_effect(fix, Gb))
                    if fix.coeff is not None:
                        per_key[:, :keys] += qkfix.key_effect(fix, Gb, g.group)
            for n, s in enumerate(self.sites):
                if s.qk_fixed and s.pos.layer == layer:
                    self.sink(n, {"": torch.cat(q_rows, dim=1) if s.adapter.qk == "q" else per_key})

    def _observer(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """A hook on layer ``layer``'s scores ``[batch, head, t, s]`` that keeps only which are not
        masked (``[batch, 1, t, s]`` where every head has the same mask): the fix recomputes the
        scores from q and k rather than hold a ``[batch, head, t, s]`` tensor per layer."""
        def observe(scores: torch.Tensor) -> torch.Tensor:
            seen = qkfix.unmasked(scores.detach())
            self.seen[layer] = seen[:, :1] if bool((seen == seen[:, :1]).all()) else seen
            return scores
        return observe

    def _fixes(self, layer: int) -> Iterator[tuple[slice, int, qkfix.Fix]]:
        """Layer ``layer``'s QK fix from the clean run, per block of query rows (the rows, how many
        leading keys any of them sees, and the fix of its query and key nodes on those: ``qk.node_fix``,
        the edge fix with one sender, each node's own change; no query or key part where the layer has
        no such sites). When GradDrop will need it again, its factored form is kept."""
        g, acc, clean = self.geoms[layer], self.acc, self.clean
        seen, A = self.seen.pop(layer), clean[g.pattern_hook].detach()  # [batch, 1 or head, t, s], [batch, head, t, s]
        q, k = g.dotted("q", clean).detach(), g.dotted("k", clean).detach()  # [batch, pos, (kv-)head, d_head]
        v = None if self.kept is None else clean[g.v_hook].detach().to(acc).repeat_interleave(g.group, dim=2)
        q_n, k_n = g.dotted("q", self.noise), g.dotted("k", self.noise)
        kinds = {s.adapter.qk for s in self.sites if s.qk_fixed and s.pos.layer == layer}
        kept = []
        for rows, keys in qkfix.row_blocks(seen, ROW_BLOCKS if seen.shape[2] >= BLOCKED_FROM else 1):
            qb, kb, Ab = q[:, rows].to(acc), k[:, :keys].to(acc), A[:, :, rows, :keys].to(acc)
            # the pattern too is recomputed (not Ab, rounded in the model's dtype), as for edges: one contract
            rw = qkfix.rows(qkfix.scores(qb, kb, seen[:, :, rows, :keys], g), qb, kb, g)  # [batch, head, rows, keys]
            fix = qkfix.node_fix(rw, qb, kb, q_n[:, rows].to(acc) if "q" in kinds else None,
                                 k_n[:, :keys].to(acc) if "k" in kinds else None, g)
            if v is not None:  # [batch, pos, head, d_head], kv-heads repeated
                self._check_mixing(layer, Ab, v[:, :keys], clean[g.z_hook][:, rows])
                kept.append((rows, keys, qkfix.keep(fix, v[:, :keys])))  # before the effects use the fix up
            yield rows, keys, fix
        if self.kept is not None:
            self.kept[layer] = kept

    def _check_mixing(self, layer: int, A: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> None:
        """Fail unless the head outputs ``z`` ``[batch, rows, head, d_head]`` at layer ``layer``'s
        z hook are the pattern ``A`` ``[batch, head, rows, keys]`` times the values ``v`` ``[batch,
        keys, head, d_head]``, which GradDrop's kept fix relies on (dL/dA = dL/dz v^T)."""
        z = z.detach().to(A.dtype)
        err = float((torch.einsum("bhts,bshd->bthd", A, v) - z).abs().max()) / max(float(z.abs().max()), 1e-30)
        if not err <= rounding(self.host.dtype):
            raise UnsupportedModelError(
                f"GradDrop's QK fix needs layer {layer}'s head outputs at {self.geoms[layer].z_hook} to be its "
                f"attention pattern times the values at {self.geoms[layer].v_hook}, and they are not (relative "
                f"mismatch {err:.2g}: e.g. an SAE spliced in there without its error term, or a hook that changes "
                "them); use method='atp+qk', or splice the SAE with use_error_term=True")

    def graddrop(self, first: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """sum_l |I_l| per site: one partial backward per layer l, from the residual stream entering
        it with the gradient it has after the layer (the layer's own path dropped)."""
        # every cut below a node's layer leaves its gradient unchanged: I_l = Iatp for those l
        sites = self.sites
        gd = {n: {grp: v.abs() * sites[n].pos.layer for grp, v in est.items()} for n, est in first.items()}

        def add(n: int, est: dict[str, torch.Tensor]) -> None:
            for grp, v in est.items():
                gd[n][grp] += v.abs()

        self.sink = add
        for layer in range(self.host.n_layers):
            pre, post = self.resid[layer]
            below = [n for n, s in enumerate(sites) if s.pos.layer < layer]
            needed = sorted({sites[n].hook if self._plain(n) else self.geoms[sites[n].pos.layer].q_hook
                             for n in below})
            with torch.enable_grad():  # QK-fixed sites below the cut are estimated by their hooks here
                cut = _grad(self.clean[pre], {h: self.clean[h] for h in needed}, self.full[post],
                            retain=True) if needed else []
            with torch.no_grad():
                variant = dict(zip(needed, cut))
                for n, s in enumerate(sites):
                    if not self._plain(n) or s.pos.layer > layer:
                        continue  # QK-fixed: added by the hook; above the cut: counted in gd's initial value
                    elif s.pos.layer == layer and not s.pos.on_resid:
                        continue  # I_l = 0: the node's only path out is the write that was cut
                    add(n, self._plain_estimate(n, {s.hook: self.full[post]} if s.pos.layer == layer else variant))
        return gd


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

"""Exact edge patching, batched: many patched copies of clean prompts in one forward pass.

Patching edge u -> v: v alone reads resid + (u(noise) - u(live)), where u(live) is u's write in
this run; every other reader sees the residual as it is. For one patched edge u(live) = u(clean)
(u runs before v and nothing upstream changed). With many edges patched (faithfulness: every edge
outside a circuit), each receiver reads its own residual with the listed senders swapped for their
corrupt writes; with every edge patched each receiver reads the corrupt run's residual, so the
model computes the corrupt run exactly.

A receiver's changed read is fed to it alone by recomputing it from the changed residual: a head's
q/k/v as ``ln1(x + delta) @ W + b`` at ``hook_q/k/v`` (that head only), an MLP as
``mlp(ln2(x + delta))`` at ``hook_mlp_out``, the logits by adding delta at the last ``resid_post``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.runs import run
from ..hosts.structure import Structure, hook_names
from .graph import Graph
from .values import head_writes, sender_hooks


@dataclass
class SingleEdges:
    """Copy c patches edge ``edge[c]`` at position ``pos[c]`` (-1: at every position)."""

    edge: torch.Tensor  # [copies] long
    pos: torch.Tensor  # [copies] long


@dataclass
class Complement:
    """Every copy patches the edges where ``patched`` is True: ``[edge]`` (every position) or ``[edge, pos]``."""

    patched: torch.Tensor


@dataclass
class Writes:
    """Sender writes of one run, kept compact (z rather than z @ W_O): the embedding ``[copies, pos,
    d_model]``, each layer's z ``[copies, pos, head, d_head]`` and MLP output ``[copies, pos, d_model]``."""

    embed: torch.Tensor
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, parts: Structure, values: dict[str, torch.Tensor]) -> "Writes":
        w = cls(values[hook_names(0).resid_pre])
        for layer in range(parts.n_layers):
            w.z[layer] = values[hook_names(layer).z]
            if not parts.attn_only:
                w.mlp[layer] = values[hook_names(layer).mlp_out]
        return w

    def rows(self, rows: torch.Tensor) -> "Writes":
        return Writes(self.embed[rows], {k: v[rows] for k, v in self.z.items()},
                      {k: v[rows] for k, v in self.mlp.items()})

    def map(self, fn: Callable[..., torch.Tensor], *others: "Writes") -> "Writes":
        """``fn`` applied write by write to ``self`` and ``others`` (each write's tensors in that order)."""
        return Writes(fn(self.embed, *(o.embed for o in others)),
                      {k: fn(v, *(o.z[k] for o in others)) for k, v in self.z.items()},
                      {k: fn(v, *(o.mlp[k] for o in others)) for k, v in self.mlp.items()})

    def all_before(self, parts: Structure, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Writes of the first ``n`` senders: ``[copies, pos, n, d_model]``."""
        out = [self.embed.to(dtype)[:, :, None]]
        for layer in range(parts.n_layers):
            if sum(w.shape[2] for w in out) < n:
                out.append(head_writes(parts, layer, self.z[layer], dtype))
            if not parts.attn_only and sum(w.shape[2] for w in out) < n:
                out.append(self.mlp[layer].to(dtype)[:, :, None])
        return torch.cat(out, dim=2)[:, :, :n]

    def one(self, parts: Structure, graph: Graph, sender: int, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One sender's write in copies ``rows``: ``[rows, pos, d_model]``."""
        s = graph.senders[sender]
        if s.kind == "embed":
            return self.embed[rows].to(dtype)
        if s.kind == "mlp":
            return self.mlp[s.layer][rows].to(dtype)
        z = self.z[s.layer][rows, :, s.head].to(dtype)  # [rows, pos, d_head]
        return torch.einsum("bte,ed->btd", z, parts.W_O(s.layer)[s.head].to(dtype))


def noise_run(parts: Structure, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Writes]:
    """Logits and sender writes of the corrupt prompts (one forward, no grad)."""
    with torch.no_grad():
        logits, values = run(parts.host, tokens, mask, sender_hooks(parts))
    return logits, Writes.of(parts, values)


class _Deltas:
    """How each receiver's read changes in one patched run: delta ``[copies, pos, receivers, d]``
    for a group of receivers, from the noise writes and the writes live in this run."""

    def __init__(self, parts: Structure, graph: Graph, plan: SingleEdges | Complement, noise: Writes,
                 live: Writes, mask: torch.Tensor, dtype: torch.dtype):
        self.parts, self.graph, self.plan, self.noise, self.live, self.dtype = parts, graph, plan, noise, live, dtype
        self.mask = mask.to(dtype)  # [copies, pos]: padding positions are never patched
        if isinstance(plan, Complement):
            device = noise.embed.device
            dense = torch.zeros((len(graph.senders), len(graph.receivers)) + plan.patched.shape[1:], dtype=dtype,
                                device=device)
            dense[graph.sender_index.to(device), graph.receiver_index.to(device)] = plan.patched.to(device, dtype)
            self.dense = dense  # [sender, receiver(, pos)]

    def __call__(self, receivers: list[int], copies: int, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(delta ``[copies, pos, len(receivers), d_model]``, patched ``[copies, len(receivers)]`` bool),
        or None when no copy patches any of ``receivers``."""
        g, stage = self.graph, self.graph.receivers[receivers[0]].stage
        n = g.senders_before(stage)
        if isinstance(self.plan, Complement):
            m = self.dense[:n, receivers]  # [senders, receivers(, pos)]
            if not bool(m.any()):
                return None
            diff = self.noise.all_before(self.parts, n, self.dtype) - self.live.all_before(self.parts, n, self.dtype)
            spec = "ctsd,srt->ctrd" if m.ndim == 3 else "ctsd,sr->ctrd"
            delta = torch.einsum(spec, diff, m) * self.mask[:, :, None, None]
            patched = (m.flatten(2).any(-1) if m.ndim == 3 else m.bool()).any(0)
            return delta, patched[None].expand(copies, -1)
        receiver = g.receiver_index[self.plan.edge]  # [copies]
        local = {r: i for i, r in enumerate(receivers)}
        hit = torch.tensor([int(r) in local for r in receiver.tolist()], dtype=torch.bool)
        if not bool(hit.any()):
            return None
        d = self.noise.embed.shape[-1]
        delta = torch.zeros(copies, t, len(receivers), d, dtype=self.dtype, device=self.noise.embed.device)
        patched = torch.zeros(copies, len(receivers), dtype=torch.bool)
        sender = g.sender_index[self.plan.edge]
        for s in sender[hit].unique().tolist():
            rows = (hit & (sender == s)).nonzero().flatten()
            diff = (self.noise.one(self.parts, g, s, rows, self.dtype)
                    - self.live.one(self.parts, g, s, rows, self.dtype))  # [rows, pos, d]
            pos = self.plan.pos[rows]
            at = ((pos[:, None] < 0) | (torch.arange(t)[None] == pos[:, None])).to(diff.device)  # [rows, pos]
            at = at & self.mask[rows].bool()
            cols = torch.tensor([local[int(r)] for r in receiver[rows].tolist()])
            delta[rows, :, cols] = diff * at[:, :, None].to(self.dtype)
            patched[rows, cols] = True
        return delta, patched.to(delta.device)


def patched_logits(parts: Structure, graph: Graph, tokens: torch.Tensor, mask: torch.Tensor, noise: Writes,
                   plan: SingleEdges | Complement, dtype: torch.dtype) -> torch.Tensor:
    """Logits of ``tokens`` ``[copies, pos]`` with the edges of ``plan`` patched from ``noise``
    (the corrupt writes of each copy's pair, ``[copies, ...]``)."""
    copies, t = tokens.shape
    live = Writes(torch.empty(0))  # the embedding is set when blocks.0.hook_resid_pre fires
    resid: dict[int, torch.Tensor] = {}  # layer -> the residual its heads read
    mlp_in: dict[int, torch.Tensor] = {}
    deltas = _Deltas(parts, graph, plan, noise, live, mask, dtype)
    patches: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    busy = [False]  # inside a recomputation: hooks the recomputed modules fire (a Bridge's aliases) pass through

    def outside(patch: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x if busy[0] else patch(x)

    def recompute(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        busy[0] = True
        try:
            return fn()
        finally:
            busy[0] = False

    def record_pre(layer: int):
        def patch(x):
            resid[layer] = x
            if layer == 0:
                live.embed = x
            if parts.parallel:
                mlp_in[layer] = x
            return x
        return patch

    def record(store: dict, layer: int):
        def patch(x):
            store[layer] = x
            return x
        return patch

    def attention_input(layer: int, which: str):
        def patch(x):
            got = deltas(graph.receivers_of(which, layer), copies, t)
            if got is None:
                return x
            delta, patched = got
            rows = patched.any(1).nonzero().flatten()
            xr = resid[layer][rows]
            # [rows, pos, heads, d_model]
            normed = recompute(lambda: parts.ln1(layer, xr[:, :, None] + delta[rows].to(xr.dtype)))
            new = parts.project(layer, which, normed).to(x.dtype)
            out = x.clone()
            out[rows] = torch.where(patched[rows][:, None, :, None], new, x[rows])
            return out
        return patch

    def mlp_output(layer: int):
        def patch(x):
            got = deltas(graph.receivers_of("mlp", layer), copies, t)
            if got is not None:
                delta, patched = got
                rows = patched[:, 0].nonzero().flatten()
                x = x.clone()
                x[rows] = recompute(lambda: parts.mlp_of(layer, mlp_in[layer][rows] + delta[rows, :, 0].to(x.dtype)))
            live.mlp[layer] = x
            return x
        return patch

    def logits_input(x):
        got = deltas(graph.receivers_of("logits", parts.n_layers), copies, t)
        return x if got is None else x + got[0][:, :, 0].to(x.dtype)

    for layer in range(parts.n_layers):
        h = hook_names(layer)
        patches[h.resid_pre] = record_pre(layer)
        for which in "qkv":
            patches[h.qkv(which)] = attention_input(layer, which)
        patches[h.z] = record(live.z, layer)
        if not parts.attn_only:
            if not parts.parallel:
                patches[h.resid_mid] = record(mlp_in, layer)
            patches[h.mlp_out] = mlp_output(layer)
    last = hook_names(parts.n_layers - 1).resid_post
    patches[last] = logits_input
    with torch.no_grad():
        logits, _ = run(parts.host, tokens, mask, patches={h: outside(p) for h, p in patches.items()})
    return logits

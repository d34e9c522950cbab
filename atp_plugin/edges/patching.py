"""Exact edge patching, batched: many patched copies of clean prompts in one forward pass.

Patching edge u -> v: v alone reads resid + (u(noise) - u(live)), where u(live) is u's write in
this run; every other reader sees the residual as it is. For one patched edge u(live) = u(clean)
(u runs before v and nothing upstream changed). With many edges patched (faithfulness: every edge
outside a circuit), each receiver reads its own residual with the listed senders swapped for their
corrupt writes; with every edge patched each receiver reads the corrupt run's residual, so the
model computes the corrupt run exactly.

A receiver's changed read is fed to it alone by recomputing it from the changed residual (its
reader group's ``patches``): a head's q/k/v as ``ln1(x + delta) @ W + b`` at ``hook_q/k/v`` (that
head only), an MLP as ``mlp(ln2(x + delta))`` at ``hook_mlp_out``, a dictionary's node from the MLP
and encoder at ``x + delta``, the logits by adding delta at the last ``resid_post``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..engine.pairs import Batch
from ..engine.runs import run
from ..hosts.structure import Structure
from .graph import Graph
from .groups import Patch, PatchedRun, Readers, Values, Writes
from .values import receiver_hooks, record, sender_hooks


@dataclass
class SingleEdges:
    """Copy c patches edge ``edge[c]`` at position ``pos[c]`` (-1: at every position)."""

    edge: torch.Tensor  # [copies] long
    pos: torch.Tensor  # [copies] long


@dataclass
class Complement:
    """Every copy patches the edges where ``patched`` is True: ``[edge]`` (every position) or ``[edge, pos]``."""

    patched: torch.Tensor


def noise_run(parts: Structure, graph: Graph, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Writes]:
    """Logits and sender writes of the corrupt prompts (one forward, no grad)."""
    with torch.no_grad():
        logits, values = run(parts.host, tokens, mask, sender_hooks(graph))
    return logits, record(graph, values)


class _Deltas:
    """How each receiver's read changes in one patched run: delta ``[copies, pos, receivers, d]``
    for receivers of one reader group, from the noise writes and the writes live in this run."""

    def __init__(self, graph: Graph, plan: SingleEdges | Complement, noise: Writes, live: Values,
                 mask: torch.Tensor, dtype: torch.dtype):
        """``live``: the hook values recorded so far in the patched run (filled as its hooks fire)."""
        self.graph, self.plan, self.noise, self.live, self.dtype = graph, plan, noise, live, dtype
        self.mask = mask.to(dtype)  # [copies, pos]: padding positions are never patched
        self.records: dict[int, Values] = {}  # writer group -> its record in this run, once its hooks have fired
        self.one = torch.ones(1, 1, dtype=dtype)  # one sender patched, for one receiver
        if isinstance(plan, Complement):
            device = noise.device
            dense = torch.zeros((len(graph.senders), len(graph.receivers)) + plan.patched.shape[1:], dtype=dtype,
                                device=device)
            dense[graph.sender_index.to(device), graph.receiver_index.to(device)] = plan.patched.to(device, dtype)
            self.dense = dense  # [sender, receiver(, pos)]

    def _live(self, lo: int, hi: int) -> Writes:
        """The records in this run of the writer groups of senders ``lo`` .. ``hi - 1`` (each group's
        once: a dictionary's encodes its input)."""
        out: Values = {}
        for w, start in zip(self.graph.writers, self.graph.writer_start):
            if start < hi and start + len(w.senders) > lo:
                if id(w) not in self.records:
                    self.records[id(w)] = w.record(self.live)
                out.update(self.records[id(w)])
        return Writes(out)

    def __call__(self, group: Readers, members: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(delta ``[copies, pos, len(members), d_model]``, patched ``[copies, len(members)]`` bool),
        or None when no copy patches any of the group's receivers ``members``."""
        g, (copies, t) = self.graph, self.mask.shape
        receivers = [g.reader_start[id(group)] + m for m in members]
        lo, n = g.senders_before(g.receivers[receivers[0]].stage)
        if isinstance(self.plan, Complement):
            m = self.dense[lo:n, receivers]  # [senders, receivers(, pos)]
            if not bool(m.any()):
                return None
            live = self._live(lo, n).values
            delta = sum(w.change(self.noise.values, live, self.dtype, list(range(len(w.senders))),
                                 m[start - lo:start - lo + len(w.senders)])
                        for w, start in zip(g.writers, g.writer_start) if lo <= start < n)
            assert isinstance(delta, torch.Tensor)
            delta = delta * self.mask[:, :, None, None]
            patched = (m.flatten(2).any(-1) if m.ndim == 3 else m.bool()).any(0)
            return delta, patched[None].expand(copies, -1)
        receiver = g.receiver_index[self.plan.edge]  # [copies]
        local = {r: i for i, r in enumerate(receivers)}
        hit = torch.tensor([int(r) in local for r in receiver.tolist()], dtype=torch.bool)
        if not bool(hit.any()):
            return None
        delta = torch.zeros(copies, t, len(receivers), g.d_model, dtype=self.dtype, device=self.noise.device)
        patched = torch.zeros(copies, len(receivers), dtype=torch.bool)
        sender = g.sender_index[self.plan.edge]
        for s in sender[hit].unique().tolist():
            rows = (hit & (sender == s)).nonzero().flatten()
            w, start = g.writer_of(s)
            live = self._live(s, s + 1).values  # the sender's own group's record
            new, old = ({k: v[k][rows] for k in live} for v in (self.noise.values, live))
            diff = w.change(new, old, self.dtype, [s - start], self.one)[:, :, 0]
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
    (the corrupt writes of each copy's pair, ``[copies, ...]``): each reader group's patches, and
    the hooks writers and readers read recorded as they fire (after any patch there)."""
    live: Values = {}
    state = PatchedRun(_Deltas(graph, plan, noise, live, mask, dtype), live)
    patches: dict[str, list[Patch]] = {}
    for group in graph.readers:
        for hook, fn in group.patches(state).items():
            patches.setdefault(hook, []).append(fn)
    recorded = sender_hooks(graph) | receiver_hooks(graph)

    def hook_fn(name: str) -> Patch:
        fns = patches.get(name, [])

        def fn(x: torch.Tensor) -> torch.Tensor:
            if state.busy:  # in a recomputation: hooks the recomputed modules fire (a Bridge's aliases) pass
                return x
            for patch in fns:
                x = patch(x)
            if name in recorded:
                state.live[name] = x
            return x
        return fn

    with torch.no_grad():
        logits, _ = run(parts.host, tokens, mask, patches={h: hook_fn(h) for h in set(patches) | recorded})
    return logits


class EdgePlan(ABC):
    """Edge patches as a plan for the engine's planner (``engine.plans.PatchPlan``): the noise side of
    a batch is the corrupt run's sender writes (or, with ``mean``, every sender's mean write), and
    each copy runs ``patched_logits`` with what its set patches (``copies``). Subclasses say where
    the sets patch (``touched``) and what they patch."""

    whole_batches = False  # copies per pass from the engine's budget

    def __init__(self, parts: Structure, graph: Graph, n_sets: int, width: int, dtype: torch.dtype,
                 mean: Writes | None = None):
        """``width``: the prompts' tokens; ``mean``: mean writes ``[1, pos, ...]`` to patch from
        instead of the corrupt run's (mean ablation)."""
        self.parts, self.graph, self._n_sets, self.width = parts, graph, n_sets, width
        self.dtype, self.mean = dtype, mean

    @property
    def n_sets(self) -> int:
        return self._n_sets

    def noise(self, batch: Batch) -> tuple[torch.Tensor, Writes]:
        logits, writes = noise_run(self.parts, self.graph, batch.corrupt, batch.mask)
        if self.mean is not None:
            writes = self.mean.rows(torch.zeros(len(batch.idx), dtype=torch.long, device=self.mean.device))
        return logits, writes

    def held(self, noise: Writes) -> int:
        """A copy's corrupt writes, and the change fed to the receivers of a reader group with the
        same-sized sum it is built from (``_Deltas``: ``[pos, receivers, d_model]`` each)."""
        receivers = max((len(group.receivers) for group in self.graph.readers), default=0)
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(v[:1].numel() * v.element_size() for v in noise.values.values()) \
            + 2 * self.width * receivers * self.graph.d_model * size

    def sets(self, start: int, stop: int) -> EdgeRange:
        return EdgeRange(self, start, stop)

    @abstractmethod
    def touched(self, start: int, stop: int) -> torch.Tensor:
        """``[sets, pos]`` bool: the positions the sets ``start..stop-1`` patch."""

    @abstractmethod
    def copies(self, sets: torch.Tensor) -> SingleEdges | Complement:
        """What copies patching the sets ``sets`` ``[copies]`` (ordered) patch."""


class EdgeRange:
    """An ``EdgePlan``'s sets ``start..stop-1`` (``engine.plans.SetRange``)."""

    def __init__(self, plan: EdgePlan, start: int, stop: int):
        self.plan, self.start = plan, start
        self.touched = plan.touched(start, stop)  # [sets, pos]

    def run(self, copies: Batch, noise: Writes, rows: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        p = self.plan
        return patched_logits(p.parts, p.graph, copies.clean, copies.mask, noise.rows(rows.to(noise.device)),
                              p.copies(self.start + sets), p.dtype)


class SingleEdgePatches(EdgePlan):
    """Set i patches edge ``edges[i]`` at position ``pos[i]`` (-1: at every position) alone."""

    def __init__(self, parts: Structure, graph: Graph, edges: torch.Tensor, pos: torch.Tensor, width: int,
                 dtype: torch.dtype):
        super().__init__(parts, graph, len(edges), width, dtype)
        self.edges, self.pos = edges.cpu().long(), pos.cpu().long()  # [sets] each

    def touched(self, start: int, stop: int) -> torch.Tensor:
        pos = self.pos[start:stop]
        every = pos < 0
        out = every[:, None].expand(-1, self.width).clone()  # [sets, pos]
        out[(~every).nonzero().flatten(), pos[~every]] = True
        return out

    def copies(self, sets: torch.Tensor) -> SingleEdges:
        return SingleEdges(self.edges[sets], self.pos[sets])


class CircuitPatches(EdgePlan):
    """Set i patches every edge ``patched[i]`` marks at once (a circuit's complement: faithfulness),
    ``[edge]`` (every position) or ``[edge, pos]`` bool; it touches every position. A forward pass
    runs one circuit over one whole batch of pairs (``whole_batches``), as the clean run does, so
    that a circuit whose complement is empty gives the clean metric bit for bit."""

    whole_batches = True

    def __init__(self, parts: Structure, graph: Graph, patched: list[torch.Tensor], width: int, dtype: torch.dtype,
                 mean: Writes | None = None):
        super().__init__(parts, graph, len(patched), width, dtype, mean)
        self.patched = patched

    def touched(self, start: int, stop: int) -> torch.Tensor:
        return torch.ones(stop - start, self.width, dtype=torch.bool)

    def copies(self, sets: torch.Tensor) -> Complement:
        return Complement(self.patched[int(sets[0])])  # a pass's copies are of one circuit

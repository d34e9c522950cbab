"""The edge graph over the residual stream: senders write into it, receivers read from it.

The graph is made of writer and reader groups (``edges.groups``); ``edges.build`` builds it from
the model's structure and the dictionaries of features given.

Senders: the embedding (``embed``: what ``blocks.0.hook_resid_pre`` holds, token plus positional
embedding), each head's write ``z_h @ W_O[h]`` (``L1.H2``) and each MLP's output (``mlp1``).
Receivers: each head's query, key and value input (``L3.H0.q``, ``L3.H0.k``, ``L3.H0.v``; under
grouped-query attention keys and values per kv-head, ``L3.KV0.k``), each MLP's input (``mlp2``)
and the logits (``logits``: the final residual, before ``ln_final``). Edge ``u -> v`` exists when
u writes before v reads: a layer's heads read what the embedding and earlier layers wrote; its MLP
also reads that layer's heads, except in parallel-attention blocks; the logits read everything.

Every write and read happens at a *stage*: the embedding writes at 0, layer l's heads at 2l + 1 and
its MLP at 2l + 2; layer l's heads read at 2l + 1, its MLP at 2l + 2 (2l + 1 if parallel) and the
logits at 2L + 1. An edge exists iff the sender's stage is below the receiver's.

A dictionary of features (an SAE at ``hook_mlp_out`` or ``hook_attn_out``, a transcoder into
``hook_mlp_out``) replaces the component it splits: its kept features (``mlp1.f12``), its error
node (``mlp1.error``) and the rest of its features (``mlp1.rest``) write in place of the MLP
(or the layer's heads) and, at an MLP, read in place of it. An SAE on the residual stream
(``resid_pre2.f5``) reads and writes at a half stage between two (2l + 0.5 before layer l's heads)
and is a bottleneck: a receiver after it reads no sender before it (``cuts``, ``senders_before``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class Sender:
    name: str
    kind: str  # "embed" | "head" | "mlp" | "feature" | "error" | "rest"
    layer: int  # -1 for the embedding
    head: int  # -1 unless a head
    stage: float  # an int, or k + 0.5 for a dictionary on the residual stream between stages k and k + 1
    index: int = -1  # a feature's number in its dictionary


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str  # "q" | "k" | "v" | "mlp" | "logits" | "feature" | "error" | "rest"
    layer: int  # n_layers for the logits
    head: int  # query head for q, kv-head for k/v, -1 otherwise
    stage: float
    through: tuple[int, ...] = ()  # the senders its component writes through (none: the logits, terminal)
    across: bool = False  # what it reads at s reaches its component's write at every t >= s (keys, values)
    index: int = -1  # a feature's number in its dictionary


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and the edges between them; edges ordered by receiver, then sender."""

    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]
    n_layers: int
    n_heads: int
    n_kv: int
    d_model: int = 0
    cuts: tuple[float, ...] = ()  # stages of dictionaries on the residual stream: bottlenecks
    writers: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # ``groups.Writers``, in stage order
    readers: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # ``groups.Readers``, in stage order

    @cached_property
    def writer_start(self) -> tuple[int, ...]:
        """Writer group -> its first sender's number."""
        return tuple(int(x) for x in torch.cumsum(torch.tensor([0] + [len(w.senders) for w in self.writers]), 0)[:-1])

    def writer_of(self, sender: int) -> tuple[Any, int]:
        """The writer group of sender number ``sender`` and its first sender's number."""
        i = int(torch.searchsorted(torch.tensor(self.writer_start), sender, right=True)) - 1
        return self.writers[i], self.writer_start[i]

    @cached_property
    def reader_start(self) -> dict[int, int]:
        """id(reader group) -> its first receiver's number."""
        out, n = {}, 0
        for group in self.readers:
            out[id(group)] = n
            n += len(group.receivers)
        return out

    @cached_property
    def sender_index(self) -> torch.Tensor:
        """Edge -> sender number ``[n_edges]``."""
        return self._pairs[0]

    @cached_property
    def receiver_index(self) -> torch.Tensor:
        """Edge -> receiver number ``[n_edges]``."""
        return self._pairs[1]

    @cached_property
    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        s_stage = torch.tensor([s.stage for s in self.senders], dtype=torch.float64)
        r_stage = torch.tensor([r.stage for r in self.receivers], dtype=torch.float64)
        lo = torch.tensor([self.cut_before(r.stage) for r in self.receivers], dtype=torch.float64)
        r, s = ((s_stage[None, :] < r_stage[:, None]) & (s_stage[None, :] >= lo[:, None])).nonzero(as_tuple=True)
        return s, r

    @cached_property
    def receiver_start(self) -> torch.Tensor:
        """Receiver -> its first edge ``[n_receivers]`` (its edges are the next ones, one per sender of
        ``senders_before(stage)``)."""
        counts = torch.bincount(self.receiver_index, minlength=len(self.receivers))
        return torch.cumsum(counts, 0) - counts

    @property
    def n_edges(self) -> int:
        return len(self.sender_index)

    @cached_property
    def names(self) -> list[str]:
        """``"sender -> receiver"`` for every edge."""
        return [f"{self.senders[s].name} -> {self.receivers[r].name}"
                for s, r in zip(self.sender_index.tolist(), self.receiver_index.tolist())]

    @cached_property
    def edge_of(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def reads_of(self) -> tuple[tuple[int, ...], ...]:
        """Sender -> the receivers its component reads through (none: the embedding, a source)."""
        out: list[list[int]] = [[] for _ in self.senders]
        for r, receiver in enumerate(self.receivers):
            for s in receiver.through:
                out[s].append(r)
        return tuple(tuple(x) for x in out)

    def cut_before(self, stage: float) -> float:
        """The stage of the last bottleneck before ``stage`` (-inf without one): what reads at
        ``stage`` reads only the senders from there on."""
        return max((c for c in self.cuts if c < stage), default=-math.inf)

    def senders_before(self, stage: float) -> tuple[int, int]:
        """The senders a receiver at ``stage`` reads, ``range(*senders_before(stage))``: those that
        write before it and not before a bottleneck in between (senders are in stage order, so a
        window)."""
        lo = self.cut_before(stage)
        return (sum(1 for s in self.senders if s.stage < lo), sum(1 for s in self.senders if s.stage < stage))

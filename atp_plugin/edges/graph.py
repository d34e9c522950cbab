"""The edge graph over the residual stream: senders write into it, receivers read from it.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..hosts.structure import Structure


@dataclass(frozen=True)
class Sender:
    name: str
    kind: str  # "embed" | "head" | "mlp"
    layer: int  # -1 for the embedding
    head: int  # -1 unless a head
    stage: int


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str  # "q" | "k" | "v" | "mlp" | "logits"
    layer: int  # n_layers for the logits
    head: int  # query head for q, kv-head for k/v, -1 otherwise
    stage: int
    through: tuple[int, ...] = ()  # the senders its component writes through (none: the logits, terminal)
    across: bool = False  # what it reads at s reaches its component's write at every t >= s (keys, values)


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and the edges between them; edges ordered by receiver, then sender."""

    senders: tuple[Sender, ...]
    receivers: tuple[Receiver, ...]
    n_layers: int
    n_heads: int
    n_kv: int

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
        s_stage = torch.tensor([s.stage for s in self.senders])
        r_stage = torch.tensor([r.stage for r in self.receivers])
        r, s = (s_stage[None, :] < r_stage[:, None]).nonzero(as_tuple=True)
        return s, r

    @cached_property
    def receiver_start(self) -> torch.Tensor:
        """Receiver -> its first edge ``[n_receivers]`` (its edges are the next senders_before(stage))."""
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

    def receivers_of(self, kind: str, layer: int) -> list[int]:
        """Receiver numbers of one kind in one layer, in head order."""
        return [i for i, r in enumerate(self.receivers) if r.kind == kind and r.layer == layer]

    @cached_property
    def reads_of(self) -> tuple[tuple[int, ...], ...]:
        """Sender -> the receivers its component reads through (none: the embedding, a source)."""
        out: list[list[int]] = [[] for _ in self.senders]
        for r, receiver in enumerate(self.receivers):
            for s in receiver.through:
                out[s].append(r)
        return tuple(tuple(x) for x in out)

    def senders_before(self, stage: int) -> int:
        """How many senders write before ``stage`` (senders are in stage order, so a prefix)."""
        return sum(1 for s in self.senders if s.stage < stage)


def build_graph(parts: Structure) -> Graph:
    """The edge graph of the model ``parts`` describes."""
    n, gqa, group = parts.n_layers, parts.n_kv != parts.n_heads, parts.n_heads // parts.n_kv
    senders = [Sender("embed", "embed", -1, -1, 0)]
    receivers = []
    for layer in range(n):
        first = len(senders)  # this layer's heads are senders first .. first + n_heads - 1
        senders += [Sender(f"L{layer}.H{h}", "head", layer, h, 2 * layer + 1) for h in range(parts.n_heads)]
        receivers += [Receiver(f"L{layer}.H{h}.q", "q", layer, h, 2 * layer + 1, (first + h,))
                      for h in range(parts.n_heads)]
        for which in "kv":
            receivers += [Receiver(f"L{layer}.{'KV' if gqa else 'H'}{j}.{which}", which, layer, j, 2 * layer + 1,
                                   tuple(range(first + j * group, first + (j + 1) * group)), across=True)
                          for j in range(parts.n_kv)]
        if not parts.attn_only:
            senders.append(Sender(f"mlp{layer}", "mlp", layer, -1, 2 * layer + 2))
            receivers.append(Receiver(f"mlp{layer}", "mlp", layer, -1, 2 * layer + (1 if parts.parallel else 2),
                                      (len(senders) - 1,)))
    receivers.append(Receiver("logits", "logits", n, -1, 2 * n + 1))
    return Graph(tuple(senders), tuple(receivers), n, parts.n_heads, parts.n_kv)

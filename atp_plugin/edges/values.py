"""Sender writes and receiver gradients of one run, through the graph's writer and reader groups
(``edges.groups``): a sender's write is what it adds to the residual stream, a receiver's
gradient dL/d(the residual as that receiver alone reads it)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .graph import Graph
from .groups import Values, Writes


def sender_hooks(graph: Graph) -> set[str]:
    """Hooks holding every sender's write."""
    return {h for w in graph.writers for h in w.hooks()}


def receiver_hooks(graph: Graph) -> set[str]:
    """Hooks whose values (besides their gradients) give every receiver's gradient."""
    return {h for r in graph.readers for h in r.value_hooks()}


def grad_targets(graph: Graph) -> list[str]:
    """The hooks whose gradients ``receiver_grads`` takes, each once."""
    return list(dict.fromkeys(h for r in graph.readers for h in r.grad_hooks()))


def record(graph: Graph, values: Values) -> Writes:
    """What every writer group keeps of a run (``Writers.record``)."""
    out: Values = {}
    for w in graph.writers:
        out.update(w.record(values))
    return Writes(out)


def sender_deltas(graph: Graph, new: Writes, old: Writes, dtype: torch.dtype, window: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """write(new) - write(old) of the senders ``range(*window)`` (all by default), in graph order:
    ``[batch, pos, senders, d_model]``."""
    lo, hi = (0, len(graph.senders)) if window is None else window
    out = []
    for w, start in zip(graph.writers, graph.writer_start):
        end = start + len(w.senders)
        if end <= lo or start >= hi:
            continue
        members = None if lo <= start and end <= hi else list(range(max(lo, start) - start, min(hi, end) - start))
        out.append(w.delta(new.values, old.values, dtype, members))
    return torch.cat(out, dim=2)


def receiver_grads(graph: Graph, values: Values, grads: Values, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Every receiver's gradient, in graph order, a reader group at a time (``[batch, pos,
    receivers of the group, d_model]`` each; a large model's would not all fit at once)."""
    for r in graph.readers:
        yield r.reads(values, grads, dtype)


class ReadSums:
    """The sums over IG steps of every receiver's gradient, as ``receiver_grads``' blocks."""

    def __init__(self, graph: Graph, dtype: torch.dtype):
        self.sums = [r.read_sum(dtype) for r in graph.readers]

    def add(self, values: Values, grads: Values) -> None:
        for s in self.sums:
            s.add(values, grads)

    def blocks(self) -> Iterator[torch.Tensor]:
        for s in self.sums:
            yield s.total()


def edge_products(graph: Graph, writes: torch.Tensor, reads: Iterable[torch.Tensor]) -> torch.Tensor:
    """write(sender) . read(receiver) for every edge at every position: ``[batch, edge, pos]`` from
    ``writes`` ``[batch, pos, sender, d]`` and the blocks of ``receiver_grads``. Edges run receiver by
    receiver, each over the senders it reads (a window), so a block's edges are one contiguous run."""
    out, r0 = [], 0
    for block in reads:  # [batch, pos, receivers, d]
        lo, hi = graph.senders_before(graph.receivers[r0].stage)
        prod = torch.einsum("btsd,btrd->brst", writes[:, :, lo:hi], block)  # [batch, receivers, senders, pos]
        out.append(prod.flatten(1, 2))
        r0 += block.shape[2]
    return torch.cat(out, dim=1)

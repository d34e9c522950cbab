"""Everything an edge computation runs on: the model's structure and graph, and the node engine that
holds the pairs, the bound metric, batching (lists, ``PairStream``s, ``torch.distributed`` ranks),
progress and the counts of forward and backward passes spent (each of one prompt)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from ..engine import Engine, distributed
from ..engine.pairs import Batch, PairSource
from ..engine.qk import fixable
from ..engine.runs import run
from ..hosts.structure import Structure
from .build import check_graph, check_hooks
from .graph import Graph
from .groups import Writes
from .patching import CircuitPatches, SingleEdgePatches, noise_run

#: (batch number, batch, metric of the batch's logits) -> per-pair estimates [batch, edge, pos]
Estimator = Callable[[int, Batch, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


class Context:
    """One ``attribute_edges()`` call's model, graph and engine; what edge methods, ``verify`` and
    faithfulness run through. Under ``torch.distributed`` each rank runs its share of the pairs,
    sums are added over ranks, and the pass counts are this rank's own (as the node engine's)."""

    def __init__(self, parts: Structure, graph: Graph, engine: Engine):
        self.parts, self.graph, self.engine = parts, graph, engine

    @property
    def host(self) -> Any:
        return self.engine.host

    @property
    def pairs(self) -> PairSource:
        return self.engine.pairs

    @property
    def dtype(self) -> torch.dtype:
        """The accumulation dtype: float64 for float64 models, else float32."""
        return self.engine.acc

    @property
    def forward_passes(self) -> int:
        return self.engine.forward_passes

    @forward_passes.setter
    def forward_passes(self, value: int) -> None:
        self.engine.forward_passes = value

    @property
    def backward_passes(self) -> float:
        return self.engine.backward_passes

    @backward_passes.setter
    def backward_passes(self, value: float) -> None:
        self.engine.backward_passes = value

    def batches(self, desc: str) -> Iterator[Batch]:
        """This rank's batches of pairs, with progress (the node engine's)."""
        return self.engine.batches(desc)

    def bound(self, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        """The metric of ``batch``'s pairs as a function of the logits alone."""
        return lambda logits: self.engine.metric(logits, batch.key)

    def check_structure(self) -> None:
        """Check on one clean prompt, before the method runs (not counted as its cost), that the
        host's structure reproduces the model's own values and the dictionaries' nodes are what the
        graph assumes (``build.check_graph``)."""
        first = next(iter(self.pairs.batches(1, [0])))
        with torch.no_grad():
            _, values = run(self.host, first.clean, first.mask, check_hooks(self.parts, self.graph))
        check_graph(self.parts, self.graph, values, first.mask)

    def check_qk(self) -> None:
        """Fail before any run where the edge QK fix cannot serve a layer's attention."""
        for layer in range(self.parts.n_layers):
            self.parts.check_qk(layer)  # what the structure shows, before the host's probe of the pattern
            fixable(self.host.attention(layer), "use method='atp' for edges")

    def first_order(self, desc: str, per_position: bool, forward: int, backward: int, estimate: Estimator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Means over pairs of |I| and I of every edge, ``[edge]`` (each edge at every position, to
        first order the sum over positions) or ``[edge, pos]``, from ``estimate`` on each batch;
        counts ``forward``/``backward`` passes per pair."""
        sums = abs_sums = torch.zeros((), dtype=self.dtype)  # grow to [edge(, pos)] on the first batch
        for n, batch in enumerate(self.batches(desc)):
            est = estimate(n, batch, self.bound(batch)).cpu()  # [batch, edge, pos]
            self.forward_passes += forward * len(batch.idx)
            self.backward_passes += backward * len(batch.idx)
            if not per_position:
                est = est.sum(-1)  # [batch, edge]: the edge patched at every position, to first order
            sums, abs_sums = sums + est.sum(0), abs_sums + est.abs().sum(0)
        sums, abs_sums = distributed.all_sum(sums), distributed.all_sum(abs_sums)
        count = self.pairs.counts.cpu().to(self.dtype).clamp(min=1) if per_position else float(self.pairs.n)
        return abs_sums / count, sums / count

    def edge_effects(self, edges: torch.Tensor, pos: torch.Tensor, desc: str = "edge patching"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over pairs of the exact effect I = L(clean | edge patched) - L(clean) of each edge
        ``edges[i]`` at position ``pos[i]`` (-1: every position), and the mean over pairs of |I|;
        one patched copy per (pair, edge), pairs where the position is padding skipped (the
        engine's planner). ``[len(edges)]`` each."""
        plan = SingleEdgePatches(self.parts, self.graph, edges, pos, self.pairs.width, self.dtype)
        return self.engine.mean_effects(plan, desc)

    def mean_writes(self, tokens: torch.Tensor, mask: torch.Tensor) -> Writes:
        """Every sender's write averaged over the calibration prompts ``tokens`` ``[n, pos]`` (mask
        ``mask``), per position, ``[1, pos, ...]``; this rank runs its share of them, and the sums are
        added over ranks. Counted as forward passes."""
        size = distributed.batch_for_ranks(self.engine.batch_size, len(tokens))
        total: Writes | None = None
        for rows in distributed.share(torch.arange(len(tokens)).split(size)):
            _, writes = noise_run(self.parts, self.graph, tokens[rows], mask[rows])
            self.forward_passes += len(rows)
            part = writes.map(lambda w: w.sum(0, keepdim=True).to(self.dtype))
            total = part if total is None else total.map(torch.add, part)
        assert total is not None  # every rank gets at least one batch
        return total.map(lambda w: distributed.all_sum(w) / len(tokens))

    def circuit_metrics(self, patched: list[torch.Tensor], desc: str = "faithfulness", mean: Writes | None = None
                        ) -> tuple[float, float, list[float]]:
        """Means over pairs of the metric on the clean prompts, on the corrupt prompts, and with the
        edges marked in each of ``patched`` (``[edge]`` or ``[edge, pos]`` bool) patched at once: from
        the corrupt run, or with ``mean`` (``mean_writes``) from every sender's mean write."""
        sums = torch.zeros(2 + len(patched), dtype=self.dtype)  # clean, corrupt, each circuit
        plan = CircuitPatches(self.parts, self.graph, patched, self.pairs.width, self.dtype, mean)
        for got in self.engine.patch_sets(plan, desc):  # one copy of each pair per circuit
            if got.start == 0:  # a batch's first range
                sums[0] += got.clean.sum()
                sums[1] += got.corrupt.sum()
            sums[2 + got.start:2 + got.stop] += got.value.sum(1)
        means = (distributed.all_sum(sums) / self.pairs.n).tolist()
        return means[0], means[1], means[2:]

"""Everything an edge computation runs on: the model's parts and graph, the pairs, the metric, and
counters of the forward and backward passes spent (each of one prompt)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..engine.pairs import Pairs
from .graph import Graph
from .model import Parts
from .patching import Complement, SingleEdges, Writes, noise_run, patched_logits


@dataclass
class Context:
    parts: Parts
    graph: Graph
    pairs: Pairs
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # bound: (logits, pair indices) -> [batch]
    dtype: torch.dtype  # accumulation dtype
    batch_size: int
    patch_batch_size: int
    progress: bool | None = None
    forward_passes: int = 0
    backward_passes: int = 0

    @property
    def host(self) -> Any:
        return self.parts.host

    def batches(self, desc: str) -> Iterator[torch.Tensor]:
        chunks = list(torch.arange(self.pairs.n).split(self.batch_size))
        quiet = (not self.progress) if self.progress is not None else (True if len(chunks) < 4 else None)
        yield from tqdm(chunks, desc=desc, disable=quiet, leave=False)

    def bound(self, idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The metric of pairs ``idx`` as a function of the logits alone."""
        return lambda logits: self.metric(logits, idx)

    def clean_metric(self, idx: torch.Tensor) -> torch.Tensor:
        """The metric on the clean prompts of pairs ``idx`` ``[len(idx)]``."""
        with torch.no_grad():
            logits = self.host.run(self.pairs.clean[idx], self.pairs.mask[idx].long(), [])
        self.forward_passes += len(idx)
        return self.metric(logits, idx).to(self.dtype)

    def noise(self, idx: torch.Tensor) -> tuple[torch.Tensor, Writes]:
        """The metric on the corrupt prompts of pairs ``idx`` and their sender writes."""
        logits, writes = noise_run(self.parts, self.pairs.corrupt[idx], self.pairs.mask[idx])
        self.forward_passes += len(idx)
        return self.metric(logits, idx).to(self.dtype), writes

    def patched_metric(self, idx: torch.Tensor, noise: Writes, plan: SingleEdges | Complement) -> torch.Tensor:
        """The metric on copies of the clean prompts of pairs ``idx`` ``[copies]`` with ``plan`` patched."""
        logits = patched_logits(self.parts, self.graph, self.pairs.clean[idx], self.pairs.mask[idx], noise, plan,
                                self.dtype)
        self.forward_passes += len(idx)
        return self.metric(logits, idx).to(self.dtype)

    def edge_effects(self, edges: torch.Tensor, pos: torch.Tensor, desc: str = "edge patching"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over pairs of the exact effect I = L(clean | edge patched) - L(clean) of each edge
        ``edges[i]`` at position ``pos[i]`` (-1: every position), and the mean over pairs of |I|;
        one patched copy per (pair, edge), pairs where the position is padding skipped. ``[len(edges)]`` each."""
        sums, abs_sums = torch.zeros(len(edges), dtype=self.dtype), torch.zeros(len(edges), dtype=self.dtype)
        count = torch.zeros(len(edges), dtype=self.dtype)
        for idx in self.batches(desc):
            base = self.clean_metric(idx).cpu()
            _, noise = self.noise(idx)
            mask = self.pairs.mask[idx].cpu()
            real = (pos[None] < 0) | mask[:, pos.clamp(min=0)]  # [batch, edges]
            pair, which = real.nonzero(as_tuple=True)
            for chunk in torch.arange(len(pair)).split(self.patch_batch_size):
                p, w = pair[chunk], which[chunk]
                vals = self.patched_metric(idx[p], noise.rows(p), SingleEdges(edges[w], pos[w])).cpu()
                effect = vals - base[p]
                sums.index_add_(0, w, effect)
                abs_sums.index_add_(0, w, effect.abs())
                count.index_add_(0, w, torch.ones(len(w), dtype=self.dtype))
        return sums / count.clamp(min=1), abs_sums / count.clamp(min=1)

    def circuit_metrics(self, patched: list[torch.Tensor], desc: str = "faithfulness"
                        ) -> tuple[float, float, list[float]]:
        """Means over pairs of the metric on the clean prompts, on the corrupt prompts, and with the
        edges marked in each of ``patched`` (``[edge]`` or ``[edge, pos]`` bool) patched at once."""
        clean = corrupt = 0.0
        circuits = [0.0] * len(patched)
        for idx in self.batches(desc):
            clean += float(self.clean_metric(idx).sum())
            bad, noise = self.noise(idx)
            corrupt += float(bad.sum())
            for i, mask in enumerate(patched):
                circuits[i] += float(self.patched_metric(idx, noise, Complement(mask)).sum())
        n = self.pairs.n
        return clean / n, corrupt / n, [c / n for c in circuits]

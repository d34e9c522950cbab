"""What exact patching runs: a *plan* of sets of patches, each patched into copies of the clean
prompts of every pair, that ``Engine.patch_sets`` carries out (many copies per forward pass,
copies that would patch nothing skipped, progress, ``torch.distributed`` ranks' shares of the
pairs). Node patches are one plan (``NodePatches``: sets of nodes through ``patching.patched_run``);
edge patches and faithfulness are others (``edges.patching``: single edges, circuits' complements).

A plan says, for the sets ``start..stop-1``, which token positions each set patches (a copy whose
pair has none of them real would patch nothing), how to take the noise side of a batch of pairs,
how many bytes each patched copy holds beside its forward pass (for the copies per pass), and how
to run a forward pass of copies, each patching its own set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

import torch

from .pairs import Batch
from .patching import Masks, patched_run

if TYPE_CHECKING:  # annotations only: the engine module imports this one
    from . import Engine

N = TypeVar("N")  # a plan's noise side of a batch of pairs
N_contra = TypeVar("N_contra", contravariant=True)

#: (site number, group) -> flat indices into that site's node grid ``[pos, *node]``. A node set of
#: U nodes is ordered by concatenating its keys' indices in dict order.
NodeSet = dict[tuple[int, str], torch.Tensor]
#: ``members(start, stop) -> (set, node)``: the sets start..stop-1 as two long tensors ``[entries]``,
#: set numbers counted from ``start`` and node numbers among the U. Called again for every batch
#: of pairs, so it must list the same sets every time.
Members = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def single_nodes(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Members`` of the sets of one node each: set j holds node j (exact patching)."""
    return torch.arange(stop - start), torch.arange(start, stop)


class SetRange(Protocol[N_contra]):
    """A plan's sets ``start..stop-1``: where each patches and how copies of them run."""

    @property
    def touched(self) -> torch.Tensor:
        """``[sets, pos]`` bool: the token positions each set patches."""

    def run(self, copies: Batch, noise: N_contra, rows: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """Logits of ``copies`` (the clean prompts of the batch's rows ``rows`` ``[copies]``), copy c
        patching set ``sets[c]`` (numbered from ``start``; a pass's copies come ordered by set)
        from ``noise``, the noise side of the whole batch. Run without gradients."""


class PatchPlan(Protocol[N]):
    """Sets of patches for ``Engine.patch_sets`` (see the module's docstring)."""

    @property
    def n_sets(self) -> int:
        """The number of sets."""

    @property
    def whole_batches(self) -> bool:
        """Whether each forward pass runs one set over all the pairs of one batch (the budget's
        copies per pass ignored): the patched copies then run as the clean prompts do, so a set
        that patches nothing gives L(clean) bit for bit (batch make-up moves the last bits)."""

    def noise(self, batch: Batch) -> tuple[torch.Tensor, N]:
        """The logits of the corrupt prompts of ``batch`` and what patched copies take from that run
        (one forward pass of the batch, no grad; the planner counts it)."""

    def held(self, noise: N) -> int:
        """Bytes one patched copy holds beside its forward pass (its share of ``noise``, masks,
        the changes it feeds in), from the first batch's noise side."""

    def sets(self, start: int, stop: int) -> SetRange[N]:
        """The sets ``start..stop-1`` (stop > start, or an empty range 0..0 where there are none)."""


@dataclass(frozen=True)
class SetEffects:
    """What ``Engine.patch_sets`` yields: the metric with each of the sets ``start..stop-1`` patched
    in pairs ``idx`` (this rank's share of the pairs under ``torch.distributed``: sum what you take
    over ranks), and the batch's unpatched metrics; every batch yields a range from 0."""

    idx: torch.Tensor  # [batch] pair indices
    start: int
    stop: int
    clean: torch.Tensor  # [batch] L(clean), acc dtype, CPU
    corrupt: torch.Tensor  # [batch] L(corrupt), acc dtype, CPU
    value: torch.Tensor  # [sets, batch] L(clean | S <- noise), acc dtype, CPU; L(clean) where not patched
    patched: torch.Tensor  # [sets, batch] bool: the set patches a real position of the pair

    @property
    def effect(self) -> torch.Tensor:
        """``[sets, batch]`` L(clean | S <- noise) - L(clean); 0 where not patched."""
        return self.value - self.clean[None]


class NodePatches:
    """Sets of nodes (``members`` of ``nodes``) patched jointly from the corrupt run: each copy
    patches its set's nodes at its pair's real positions, through the adapters' site masks."""

    whole_batches = False  # copies per pass from the engine's budget

    def __init__(self, engine: Engine, nodes: NodeSet, members: Members, n_sets: int):
        self.engine, self.members, self._n_sets = engine, members, n_sets
        self.keys = list(nodes)
        self.flat = torch.cat([nodes[k].cpu().long() for k in self.keys])  # [U]: index into its site's grid
        self.owner = torch.cat([torch.full((len(nodes[k]),), i, dtype=torch.long)
                                for i, k in enumerate(self.keys)])  # [U]: its key's number

    @property
    def n_sets(self) -> int:
        return self._n_sets

    def noise(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The corrupt run's logits and values of every site's ``needs`` (the node shapes are read
        from the first, so there is no probe run)."""
        logits, acts = self.engine.corrupt_run(batch)
        self.engine.node_shapes(acts)
        return logits, acts

    def held(self, noise: dict[str, torch.Tensor]) -> int:
        """A copy's corrupt values (``noise[h][copies]``) and one bool mask per site patched."""
        shapes = self.engine.node_shapes(noise)
        return sum(v[:1].numel() * v.element_size() for v in noise.values()) \
            + sum(math.prod(shapes[k]) for k in self.keys)

    def sets(self, start: int, stop: int) -> NodeRange:
        return NodeRange(self, start, stop)


class NodeRange:
    """``NodePatches``' sets ``start..stop-1``; their site masks are built on the first run."""

    def __init__(self, plan: NodePatches, start: int, stop: int):
        self.plan = plan
        shapes = plan.engine.node_shapes()
        self.shapes = [shapes[k] for k in plan.keys]
        per_pos = torch.tensor([math.prod(s[1:]) for s in self.shapes], dtype=torch.long)
        self.set_of, self.node = plan.members(start, stop)  # [entries] each
        pos = plan.flat[self.node] // per_pos[plan.owner[self.node]]  # [entries]: each entry's token position
        self.touched = torch.zeros(stop - start, plan.engine.pairs.width, dtype=torch.bool)  # [sets, pos]
        self.touched[self.set_of, pos] = True
        self._grids: dict[int, torch.Tensor] | None = None

    def grids(self) -> dict[int, torch.Tensor]:
        """Key number -> ``[sets, pos, *node]`` bool: each set's nodes at that key's site."""
        if self._grids is None:
            plan, n = self.plan, len(self.touched)
            owner = plan.owner[self.node]
            self._grids = {}
            for i in owner.unique().tolist():
                sel = owner == i
                grid = torch.zeros(n, math.prod(self.shapes[i]), dtype=torch.bool)
                grid[self.set_of[sel], plan.flat[self.node[sel]]] = True
                self._grids[i] = grid.reshape(n, *self.shapes[i])
        return self._grids

    def run(self, copies: Batch, noise: dict[str, torch.Tensor], rows: torch.Tensor, sets: torch.Tensor
            ) -> torch.Tensor:
        engine, keys, sites = self.plan.engine, self.plan.keys, self.plan.engine.sites()
        real = copies.mask.cpu()  # [copies, pos]
        masks: Masks = {}  # a copy patches its set's nodes at its pair's real positions
        for i, grid in self.grids().items():
            patched = grid[sets] & real.reshape(len(sets), grid.shape[1], *(1,) * (grid.ndim - 2))
            masks.setdefault(keys[i][0], {})[keys[i][1]] = patched.to(engine.host.device)
        hooks = {h for n in masks for h in sites[n].needs}
        at = rows.to(copies.idx.device)
        return patched_run(engine.host, sites, copies.clean, copies.mask, {h: noise[h][at] for h in hooks}, masks)

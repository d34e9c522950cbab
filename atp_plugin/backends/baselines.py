"""Baseline backends, the methods AtP* is compared against (docs/method.md, "Cost of verification").

- ``iterative``: exhaustive patching, one node at a time (the numbers of ``ap``).
- ``subsampling``: the paper's Algorithm 1. Patch random subsets of nodes jointly (each node in a
  subset with probability ``p``); a node's estimate is the mean effect over the subsets that
  contain it minus the mean over those that do not.
- ``hierarchical`` / ``blocks``: patch contiguous groups of nodes jointly and recurse into the
  groups whose effect is large; a node reached as a single-node group scores its exact effect,
  every node in a pruned group scores 0.

Everything runs through ``Engine.patch_sets`` (joint patches, many patched copies per forward
pass; exact patching is its case of one node per set), so ``Engine.forward_passes`` counts their
cost like any other backend's. Options live on the backend instance: register a configured
instance from a plugin, or pass one as ``attribute(..., method=Subsampling(n_subsets=64))``.
``joint_effects`` and ``subsample`` are the shared machinery (the false-negative bound in
``atp_plugin.bound`` reuses ``subsample``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch

from ..engine import Engine, distributed
from ..engine.plans import NodePatches, NodeSet
from ..hookspecs import hookimpl
from .builtin import ActivationPatching

#: ``sets(start, stop) -> bool [stop - start, U]``: membership of the U nodes in sets start..stop-1.
#: Called again for every batch of pairs, so it must return the same rows every time.
SetRows = Callable[[int, int], torch.Tensor]

STATS_CHUNK = 256  # subsets per step when accumulating per-node statistics


def real_nodes(engine: Engine) -> NodeSet:
    """Every node of the engine's sites at a position that is real (not padding) in some pair."""
    real = engine.pairs.mask.any(0).cpu()  # [pos]
    out: NodeSet = {}
    for key, shape in engine.node_shapes().items():
        per_pos = math.prod(shape[1:])
        out[key] = (torch.nonzero(real).reshape(-1, 1) * per_pos + torch.arange(per_pos)).reshape(-1)
    return out


def node_positions(engine: Engine, nodes: NodeSet) -> torch.Tensor:
    """The token position of each of the U nodes: ``[U]``."""
    shapes = engine.node_shapes()
    return torch.cat([nodes[k].cpu().long() // math.prod(shapes[k][1:]) for k in nodes])


def joint_effects(engine: Engine, nodes: NodeSet, sets: SetRows, n_sets: int, desc: str) -> torch.Tensor:
    """Per-pair effect of patching each set of nodes jointly,
    L(clean | S <- noise) - L(clean): ``[n_sets, n_pairs]`` (float64, CPU).

    ``Engine.patch_sets``: one patched copy of every clean prompt per set, many copies per forward
    pass; a node is patched only in the pairs where its position is real, and a set with no node
    at a real position of a pair is not run there (effect 0).
    """
    def members(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        set_of, node = sets(start, stop).nonzero(as_tuple=True)
        return set_of, node

    out = torch.zeros(n_sets, engine.pairs.n, dtype=torch.float64)
    for got in engine.patch_sets(NodePatches(engine, nodes, members, n_sets), desc):
        out[got.start:got.stop, got.idx.cpu()] = got.effect.double()
    return distributed.all_sum(out)  # every rank's share of the pairs


def random_subsets(seed: int, p: float, n_nodes: int) -> SetRows:
    """Subset j holds each node independently with probability ``p``; row j is drawn from its own
    generator (seeded by ``(seed, j)``), so any range of rows can be redrawn identically."""
    def rows(start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.stack(
            [np.random.default_rng([seed, j]).random(n_nodes) < p for j in range(start, stop)]))
    return rows


def check_subsampling(n_subsets: int, p: float) -> None:
    """Clear errors for subsampling parameters that cannot give a variance on both sides."""
    if not 0 < p < 1:
        raise ValueError(f"p (the probability that a node is in a subset) must be in (0, 1), got {p}")
    if n_subsets * min(p, 1 - p) < 2:
        raise ValueError(f"n_subsets={n_subsets} with p={p} puts each node in about {n_subsets * p:.1f} subsets and "
                         f"leaves it out of about {n_subsets * (1 - p):.1f}; both need to be at least 2: "
                         f"raise n_subsets to {math.ceil(2 / min(p, 1 - p))} or more")


@dataclass(frozen=True)
class SubsetEstimates:
    """Per node (``[U]`` each): its subsampling estimate, the difference between the mean effect
    over subsets that contain it and over subsets that do not, with Welch's standard error and
    degrees of freedom. Effects are means over the pairs where the node's position is real."""

    estimate: torch.Tensor
    std_error: torch.Tensor  # sqrt(var_in / n_in + var_out / n_out); inf with fewer than 2 on a side
    df: torch.Tensor         # Welch-Satterthwaite; nan where std_error is 0 or inf
    n_in: torch.Tensor
    n_out: torch.Tensor


def subsample(engine: Engine, nodes: NodeSet, *, n_subsets: int, p: float, seed: int,
              desc: str = "subsampling") -> SubsetEstimates:
    """Patch ``n_subsets`` random subsets of ``nodes`` jointly (one forward pass per subset per
    pair) and estimate every node's effect as the difference of means (the paper's Algorithm 1).

    With additive effects the estimate is unbiased, and its variance is about
    sum_{m != n} I(m)^2 / n_subsets whatever ``p``; interactions grow with ``p``.
    """
    check_subsampling(n_subsets, p)
    n_nodes = sum(len(v) for v in nodes.values())
    rows = random_subsets(seed, p, n_nodes)
    per_pair = joint_effects(engine, nodes, rows, n_subsets, desc)  # [S, N]
    real = engine.pairs.mask.cpu().double()  # [N, pos]
    z = per_pair @ (real / real.sum(0).clamp(min=1))  # [S, pos]: mean over the pairs where pos is real
    z = z - z.mean(0)  # a shift per position: differences unchanged, sums of squares well conditioned
    pos = node_positions(engine, nodes)
    stats = torch.zeros(2, 3, n_nodes, dtype=torch.float64)  # [in/out, (count, sum, sum of squares), U]
    for start in range(0, n_subsets, STATS_CHUNK):
        stop = min(start + STATS_CHUNK, n_subsets)
        member = rows(start, stop)  # [m, U]
        zu = z[start:stop][:, pos]  # [m, U]
        for side, sel in enumerate((member, ~member)):
            w = sel.double()
            stats[side] += torch.stack([w.sum(0), (w * zu).sum(0), (w * zu * zu).sum(0)])
    n, s, ss = stats.unbind(1)  # [2, U] each
    mean = s / n
    var = ((ss - s * mean) / (n - 1)).clamp(min=0)
    v = var / n  # [2, U]
    few = (n < 2).any(0)
    se = torch.where(few, torch.full_like(v[0], math.inf), v.sum(0).sqrt())
    df = v.sum(0) ** 2 / (v[0] ** 2 / (n[0] - 1) + v[1] ** 2 / (n[1] - 1))
    df = torch.where(few | (se == 0), torch.full_like(df, math.nan), df)
    return SubsetEstimates(mean[0] - mean[1], se, df, n[0], n[1])


def scatter(engine: Engine, nodes: NodeSet, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-node values ``[U]`` -> result tensors (0 for nodes not in ``nodes``)."""
    shapes, per_site = engine.node_shapes(), {}
    offset = 0
    for key, flat in nodes.items():
        grid = torch.zeros(math.prod(shapes[key]), dtype=engine.acc)
        grid[flat.cpu().long()] = values[offset:offset + len(flat)].to(engine.acc)
        per_site[key] = grid.reshape(shapes[key]).to(engine.host.device)
        offset += len(flat)
    return engine.assemble(per_site, engine.sites())


@dataclass(frozen=True)
class Subsampling:
    """The paper's Algorithm 1: ``n_subsets`` random joint patches, each node included with
    probability ``p``; score = |difference of means|, signed = the difference. Cost: one forward
    pass per subset per pair, whatever the number of nodes."""

    name: str = "subsampling"
    exhaustive: ClassVar[bool] = True  # patched prompts per node set: estimate() does not cover it
    n_subsets: int = 200
    p: float = 0.1
    seed: int = 0

    def run(self, engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        check_subsampling(self.n_subsets, self.p)
        nodes = real_nodes(engine)
        est = subsample(engine, nodes, n_subsets=self.n_subsets, p=self.p, seed=self.seed, desc=self.name).estimate
        if torch.isnan(est).any():
            warnings.warn(f"{self.name}: {int(torch.isnan(est).sum())} node(s) fell on one side of every subset "
                          "and score 0; raise n_subsets", stacklevel=3)
            est = torch.nan_to_num(est, nan=0.0)
        return scatter(engine, nodes, est.abs()), scatter(engine, nodes, est)


def contiguous_groups(groups: list[tuple[int, int]], n_nodes: int) -> SetRows:
    """Set j holds the nodes ``groups[j][0] .. groups[j][1] - 1`` of ``n_nodes`` (node order: site,
    then flat index)."""
    def rows(start: int, stop: int) -> torch.Tensor:
        member = torch.zeros(stop - start, n_nodes, dtype=torch.bool)
        for j, (a, b) in enumerate(groups[start:stop]):
            member[j, a:b] = True
        return member
    return rows


@dataclass(frozen=True)
class GroupPatching:
    """Hierarchical patching: split the nodes (in site order, then layer, position, head ...) into
    contiguous groups of ``block_size`` (default: ``branching`` groups), patch each group jointly
    (one forward pass per group per pair), split every group with |effect| >= threshold into
    ``branching`` contiguous parts, and repeat down to single nodes.

    A node reached alone scores |its exact effect| (signed: the effect, the numbers of ``ap``);
    a node in a pruned group scores 0. ``threshold`` is in metric units; by default it is
    ``rel_threshold`` times the largest |effect| of a first-level group. Effects that cancel
    inside a group hide its nodes: the weakness AtP* avoids.
    """

    name: str = "hierarchical"
    exhaustive: ClassVar[bool] = True  # patched prompts per node set: estimate() does not cover it
    branching: int = 4
    block_size: int | None = None
    threshold: float | None = None
    rel_threshold: float = 0.05

    def run(self, engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.branching < 2:
            raise ValueError(f"{self.name}: branching must be at least 2, got {self.branching}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be a positive number of nodes, got {self.block_size}")
        if (self.threshold is not None and self.threshold < 0) or self.rel_threshold < 0:
            raise ValueError(f"{self.name}: thresholds must be non-negative")
        nodes = real_nodes(engine)
        pos = node_positions(engine, nodes)  # [U]
        n_nodes = len(pos)
        real = engine.pairs.mask.cpu()  # [N, pos]
        signed = torch.zeros(n_nodes, dtype=torch.float64)
        size = self.block_size or math.ceil(n_nodes / self.branching)
        groups = [(a, min(a + size, n_nodes)) for a in range(0, n_nodes, size)]
        threshold, level = self.threshold, 0
        while groups:
            per_pair = joint_effects(engine, nodes, contiguous_groups(groups, n_nodes), len(groups),
                                     f"{self.name} level {level}")  # [G, N]
            has = torch.stack([real[:, pos[a:b]].any(1) for a, b in groups]).double()  # [G, N]
            effect = (per_pair * has).sum(1) / has.sum(1).clamp(min=1)  # mean over pairs with a real node
            if threshold is None:
                threshold = self.rel_threshold * float(effect.abs().max())
            deeper = []
            for (a, b), e in zip(groups, effect.tolist()):
                if b - a == 1:
                    signed[a] = e
                elif e != 0 and abs(e) >= threshold:
                    deeper += [(int(part[0]), int(part[-1]) + 1)
                               for part in np.array_split(np.arange(a, b), min(self.branching, b - a))]
            groups, level = deeper, level + 1
        return scatter(engine, nodes, signed.abs()), scatter(engine, nodes, signed)


BASELINE_BACKENDS = (
    ActivationPatching("iterative"),  # the paper's iterative baseline: one node at a time, the numbers of ap
    Subsampling(),
    GroupPatching(),
    # blocks of 16 contiguous nodes patched jointly; large blocks are patched node by node
    GroupPatching("blocks", branching=16, block_size=16),
)


@hookimpl
def atp_register_backends(register):
    for backend in BASELINE_BACKENDS:
        register(backend)

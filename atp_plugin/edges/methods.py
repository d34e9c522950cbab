"""The built-in edge methods, registered through ``atp_register_edge_methods`` as third-party ones are.

An edge method has a ``name`` (what users pass as ``attribute_edges(method=...)``), a one-line
``description``, and ``run(ctx, per_position) -> (scores, signed)``: ``ctx`` is the
``edges.context.Context`` of the call (the model's structure and graph, the pairs, the bound
metric, pass counters, exact patching), ``scores``/``signed`` are ``[edge]`` or, with
``per_position``, ``[edge, pos]``. ``Context.first_order`` runs a per-batch estimator over the
pairs and averages it; ``Context.edge_effects`` patches edges exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.path import DEFAULT_STEPS, check_steps
from ..hookspecs import hookimpl
from .context import Context
from .scores import atp_batch, ig_batch


@dataclass(frozen=True)
class EdgeAtP:
    """EAP: each sender's change dotted with the gradient of its receiver's input (one clean
    backward per pair); with ``qk``, the QK fix for edges into queries and keys."""

    qk: bool = False
    name: str = "atp"

    @property
    def description(self) -> str:
        return ("EAP with the QK fix for edges into queries and keys" if self.qk else
                "EAP: each sender's change dotted with the gradient of its receiver's input (one clean backward)")

    def run(self, ctx: Context, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qk:
            ctx.check_qk()  # unsupported attention fails here, before any run
        return ctx.first_order(
            f"edges ({self.name})", per_position, forward=2, backward=1,
            estimate=lambda n, batch, metric: atp_batch(
                ctx.parts, ctx.graph, batch.clean, batch.corrupt, batch.mask, metric, ctx.dtype, qk=self.qk,
                check=n == 0))


@dataclass(frozen=True)
class EdgeIG:
    """EAP-IG (inputs variant): gradients averaged over ``steps`` points from clean to corrupt embeddings."""

    steps: int = DEFAULT_STEPS
    name: str = "ig"

    def __post_init__(self) -> None:
        check_steps(self.steps)

    @property
    def description(self) -> str:
        return "EAP-IG (inputs variant): gradients averaged over ig_steps points from clean to corrupt embeddings"

    def run(self, ctx: Context, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.check_structure()
        return ctx.first_order(
            f"edges ({self.name})", per_position, forward=1 + self.steps, backward=self.steps,
            estimate=lambda n, batch, metric: ig_batch(
                ctx.parts, ctx.graph, batch.clean, batch.corrupt, batch.mask, metric, ctx.dtype, self.steps))


@dataclass(frozen=True)
class ExactEdges:
    """Exact edge patching of every edge: the ground truth, one patched forward per edge and pair."""

    name: str = "ap"
    description: str = "exact edge patching of every edge (the ground truth; one patched forward per edge and pair)"
    exhaustive: ClassVar[bool] = True  # estimate_edges() does not cover it

    def run(self, ctx: Context, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.check_structure()
        n_edges, t = ctx.graph.n_edges, ctx.pairs.width
        if per_position:
            edges, pos = torch.arange(n_edges).repeat_interleave(t), torch.arange(t).repeat(n_edges)
        else:
            edges, pos = torch.arange(n_edges), torch.full((n_edges,), -1)
        mean, _ = ctx.edge_effects(edges, pos)
        if per_position:
            mean = mean.reshape(n_edges, t)
        return mean.abs(), mean


@hookimpl
def atp_register_edge_methods(register):
    for method in (EdgeAtP(), EdgeAtP(qk=True, name="atp+qk"), EdgeIG(), ExactEdges()):
        register(method)

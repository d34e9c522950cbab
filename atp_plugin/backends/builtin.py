"""The AtP family (``atp``, ``atp+qk``, ``atp+gd``, ``atp*``) and exact patching (``ap``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine import Engine
from ..hookspecs import hookimpl

FEW_LAYERS = 3


@dataclass(frozen=True)
class FirstOrder:
    """AtP with the QK fix (``qk``) and/or GradDrop (``graddrop``): docs/method.md.

    Scores are means over pairs of per-pair magnitudes; signed values are reported for the
    variants without GradDrop (c_gd has no sign), NaN otherwise.
    """

    name: str
    qk: bool
    graddrop: bool

    def run(self, engine: Engine) -> tuple[dict[str, torch.Tensor], ...]:
        if self.qk:
            engine.check_qk()  # an unsupported attention is an error before any warning about GradDrop
        n_layers = engine.host.n_layers
        if self.graddrop and n_layers == 1:
            warnings.warn(f"{self.name}: GradDrop is undefined for a one-layer model; "
                          "the scores equal the method without GradDrop", stacklevel=3)
        elif self.graddrop and n_layers <= FEW_LAYERS:
            warnings.warn(
                f"{self.name}: GradDrop degenerates with few layers (this model has {n_layers}): a node whose "
                "effect runs through later layers only (e.g. a previous-token head feeding an induction head) "
                "can score near zero. Compare with method='atp+qk'.", stacklevel=3)
        sites = engine.sites(self.qk)
        mean_abs, mean, gd = engine.first_order(qk=self.qk, graddrop=self.graddrop)
        std_error = engine.assemble(engine.score_std_error, sites)
        if gd is None:
            return engine.assemble(mean_abs, sites), engine.assemble(mean, sites), std_error
        signed = {k: torch.full_like(v, float("nan")) for k, v in mean.items()}
        return engine.assemble(gd, sites), engine.assemble(signed, sites), std_error


@dataclass(frozen=True)
class ActivationPatching:
    """Exact activation patching of every node, one patched copy per (pair, node), batched."""

    name: str = "ap"
    exhaustive: ClassVar[bool] = True  # one patched prompt per node: estimate() does not cover it

    def run(self, engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        sites = engine.sites()
        mean = engine.exact()
        return engine.assemble({k: v.abs() for k, v in mean.items()}, sites), engine.assemble(mean, sites)


BUILTIN_BACKENDS = (
    FirstOrder("atp", qk=False, graddrop=False),  # attribution patching: one clean backward
    FirstOrder("atp+qk", qk=True, graddrop=False),  # AtP with the QK fix for query and key nodes
    FirstOrder("atp+gd", qk=False, graddrop=True),  # AtP with GradDrop against cancellation
    FirstOrder("atp*", qk=True, graddrop=True),  # AtP*: both (the default)
    ActivationPatching(),  # exact patching of every node: the ground truth, slow
)


@hookimpl
def atp_register_backends(register):
    for backend in BUILTIN_BACKENDS:
        register(backend)

"""A node type defined outside atp-plugin: projections of the residual stream onto directions.

``ResidualDirections(directions)`` makes one node per (layer, position, direction): the component
``c_j = <x, u_j>`` of the residual stream ``x`` at ``blocks.{layer}.hook_resid_pre`` along the unit
vector ``u_j = directions[j] / |directions[j]|``. Patching node j moves ``x`` along ``u_j`` only,
``x' = x + (c_j(noise) - c_j(clean)) u_j``, so everything orthogonal to ``u_j`` keeps its clean
value; the gradient of a node is ``dL/dc_j = <dL/dx, u_j>``.

Use it two ways:

- as an instance: ``attribute(model, clean, corrupt, metric, nodes=[ResidualDirections(dirs)])``;
- as a plugin: installing this package registers the adapter ``resid_axes`` (the first four
  coordinate axes of the residual stream) through the ``atp_plugin`` entry point group, so
  ``nodes="resid_axes"`` works in ``attribute`` and in the ``atp`` command line. A real plugin
  would ship its own directions (probes, steering vectors) as package data the same way.
"""

from __future__ import annotations

from typing import Callable

import torch

from atp_plugin import hookimpl

Directions = torch.Tensor | Callable[[int], torch.Tensor]


class ResidualDirections:
    """Nodes ``(layer, pos, direction)``: residual-stream components along given directions.

    ``directions``: ``[k, d_model]``, or a function ``d_model -> [k, d_model]`` for an adapter
    registered before any model is known.
    """

    qk = None  # not queries or keys: plain AtP

    def __init__(self, directions: Directions, name: str = "resid_directions"):
        self.directions = directions
        self.name = name

    def hooks(self, host) -> list[str]:
        """One site per layer; checks the directions' width against the model first."""
        d_model = getattr(host, "d_model", None)
        if d_model is not None:
            self._unit(d_model)
        return [f"blocks.{layer}.hook_resid_pre" for layer in range(host.n_layers)]

    def groups(self, host) -> dict[str, tuple[str, ...]]:
        return {"": ("layer", "pos", "direction")}

    def _unit(self, d_model: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Unit directions ``[k, d_model]`` (on ``like``'s device and dtype)."""
        d = self.directions(d_model) if callable(self.directions) else self.directions
        if d.ndim != 2 or d.shape[-1] != d_model:
            raise ValueError(f"{self.name}: directions must be [k, d_model={d_model}], got {tuple(d.shape)}")
        if like is not None:
            d = d.to(like.device, like.dtype)
        return d / d.norm(dim=-1, keepdim=True)

    def encode(self, hook: str, act: torch.Tensor) -> dict[str, torch.Tensor]:
        """``c = x . u^T``: ``[batch, pos, k, 1]`` (scalar nodes)."""
        return {"": (act @ self._unit(act.shape[-1], act).T)[..., None]}

    def pullback(self, hook: str, act: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dL/dc_j = <dL/dx, u_j>``: ``[batch, pos, k, 1]``."""
        return {"": (grad @ self._unit(grad.shape[-1], grad).T)[..., None]}

    def patch(self, hook: str, clean: torch.Tensor, noise: torch.Tensor,
              masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x + sum_j mask_j (c_j(noise) - c_j(clean)) u_j`` with ``masks[""]`` ``[batch, pos, k]``."""
        u = self._unit(clean.shape[-1], clean)            # [k, d_model]
        delta = ((noise - clean) @ u.T) * masks[""]       # [batch, pos, k]
        return clean + delta @ u


def first_axes(d_model: int) -> torch.Tensor:
    """The first four coordinate axes of the residual stream: ``[4, d_model]``."""
    return torch.eye(d_model)[:4]


@hookimpl
def atp_register_adapters(register) -> None:
    register(ResidualDirections(first_axes, name="resid_axes"))

"""Built-in node adapters: slices of TransformerLens hook points, one score slice per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..hookspecs import hookimpl
from ..hosts import Host


@dataclass(frozen=True)
class SliceAdapter:
    """Nodes that are slices of a site: heads of ``[batch, pos, head, d_head]``, neurons of
    ``[batch, pos, d_mlp]`` (``scalar``), or the whole vector of ``[batch, pos, d]``; one site per
    layer where ``hook`` holds ``{layer}``, else the one hook."""

    name: str
    hook: str                  # template with {layer}
    node_dim: str | None       # name of the node axis after pos ("head", "neuron"), or None
    scalar: bool = False       # each element of the last axis is a node
    qk: Literal["q", "k"] | None = None

    @property
    def layered(self) -> bool:
        return "{layer}" in self.hook

    def hooks(self, host: Host) -> list[str]:
        return [self.hook.format(layer=layer) for layer in range(host.n_layers)] if self.layered else [self.hook]

    def groups(self, host: Host) -> dict[str, tuple[str, ...]]:
        dims = (("layer",) if self.layered else ()) + ("pos",) + ((self.node_dim,) if self.node_dim else ())
        return {"": dims}

    def encode(self, hook: str, act: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": act.unsqueeze(-1) if self.scalar else act}

    def pullback(self, hook: str, act: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(hook, grad)

    def patch(self, hook: str, clean: torch.Tensor, noise: torch.Tensor,
              masks: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = masks[""] if self.scalar else masks[""].unsqueeze(-1)
        return torch.where(mask, noise, clean)


BUILTIN_ADAPTERS = (
    SliceAdapter("attn_q", "blocks.{layer}.attn.hook_q", "head", qk="q"),
    SliceAdapter("attn_k", "blocks.{layer}.attn.hook_k", "head", qk="k"),
    SliceAdapter("attn_v", "blocks.{layer}.attn.hook_v", "head"),
    SliceAdapter("attn_z", "blocks.{layer}.attn.hook_z", "head"),
    SliceAdapter("mlp_neurons", "blocks.{layer}.mlp.hook_post", "neuron", scalar=True),
    SliceAdapter("resid_pre", "blocks.{layer}.hook_resid_pre", None),
    SliceAdapter("mlp_out", "blocks.{layer}.hook_mlp_out", None),
    SliceAdapter("embed", "hook_embed", None),
)


@hookimpl
def atp_register_adapters(register):
    for adapter in BUILTIN_ADAPTERS:
        register(adapter)

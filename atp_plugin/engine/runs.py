"""Forward runs with capture and patch hooks: the only place the engine runs the model."""

from __future__ import annotations

from typing import Callable

import torch

from ..hosts import Host

Patch = Callable[[torch.Tensor], torch.Tensor]


def run(host: Host, tokens: torch.Tensor, mask: torch.Tensor, capture: set[str] | frozenset[str] = frozenset(),
        patches: dict[str, Patch] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``tokens`` (``[batch, pos]``) and return the logits and the values at ``capture``.

    ``patches`` replace site values first. With grad enabled, a captured value that does not
    require grad (frozen weights) becomes a leaf, so every captured site has a gradient.
    """
    acts: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        patch = (patches or {}).get(name)

        def hook(x: torch.Tensor, hook=None) -> torch.Tensor:
            if patch is not None:
                x = patch(x)
            if name in capture:
                if torch.is_grad_enabled() and not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                acts[name] = x
            return x

        return hook

    names = sorted(set(capture) | set(patches or {}))
    logits = host.run(tokens, mask.long(), [(name, make_hook(name)) for name in names])
    return logits, acts

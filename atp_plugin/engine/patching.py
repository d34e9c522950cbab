"""Exact activation patching, batched: many patched copies of clean prompts in one forward pass."""

from __future__ import annotations

from typing import Callable

import torch

from ..hosts import Host
from .estimates import Site
from .runs import run

# site number -> group -> bool [copies, pos, *node]
Masks = dict[int, dict[str, torch.Tensor]]


def patched_run(host: Host, sites: list[Site], tokens: torch.Tensor, mask: torch.Tensor,
                noise: dict[str, torch.Tensor], masks: Masks) -> torch.Tensor:
    """Logits of ``tokens`` (``[copies, pos]``) with the nodes in ``masks`` set to their values in
    ``noise`` (site values of the matching corrupt prompts, ``[copies, ...]``)."""
    by_hook: dict[str, list[int]] = {}
    for n in masks:
        by_hook.setdefault(sites[n].hook, []).append(n)

    def patch_for(hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def patch(x: torch.Tensor) -> torch.Tensor:
            for n in by_hook[hook]:
                x = sites[n].adapter.patch(hook, x, noise[hook], masks[n])
            return x
        return patch

    logits, _ = run(host, tokens, mask, patches={h: patch_for(h) for h in by_hook})
    return logits


def one_hot_masks(shape: tuple[int, ...], flat: torch.Tensor) -> torch.Tensor:
    """``[copies, *shape]`` bool masks, copy i selecting flat node index ``flat[i]``."""
    out = torch.zeros(len(flat), int(torch.tensor(shape).prod()), dtype=torch.bool, device=flat.device)
    out[torch.arange(len(flat), device=flat.device), flat] = True
    return out.reshape(len(flat), *shape)

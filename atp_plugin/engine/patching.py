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
    ``noise`` (values at the patched sites' ``needs`` of the matching corrupt prompts, ``[copies, ...]``).

    A site's patch sees this run's current values: its own hook's, and those of the hooks its
    adapter reads (recorded as they flow on, after any patch there).
    """
    by_hook: dict[str, list[int]] = {}
    for n in masks:
        by_hook.setdefault(sites[n].hook, []).append(n)
    read = {h for n in masks for h in sites[n].reads}
    current: dict[str, torch.Tensor] = {}  # values of the read hooks in this run

    def patch_for(hook: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def patch(x: torch.Tensor) -> torch.Tensor:
            for n in by_hook.get(hook, ()):
                s = sites[n]
                x = s.adapter.patch(hook, s.value({**current, hook: x}), s.value(noise), masks[n])
            if hook in read:
                current[hook] = x
            return x
        return patch

    logits, _ = run(host, tokens, mask, patches={h: patch_for(h) for h in set(by_hook) | read})
    return logits


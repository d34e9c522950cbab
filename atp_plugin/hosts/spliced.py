"""SAEs and transcoders spliced into a SAE-Lens ``HookedSAETransformer`` (``model.add_sae``).

Splicing replaces the hook point at the SAE's (output) hook with a wrapper module: the original
name leaves ``hook_dict`` and ``<name>.hook_sae_output`` carries the value that flows on. The host
keeps the original names working, so every node type sees the same sites with and without
splicing: a site ``<name>`` is read and patched at ``<name>.hook_sae_output``.

With ``use_error_term=True`` that value equals the model's own activation, but SAE-Lens computes
the error term under ``no_grad``: gradients below the SAE would then flow through the SAE's encoder
and decoder, not through the model. ``error_gradients`` adds a term that is zero in value and
carries the gradient the error term drops, so gradients below a spliced SAE are the model's own
(the frozen-error convention: features still get ``dL/df`` through the decoder, and the total
derivative of the SAE's output with respect to its input is the identity).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from . import Hook

OUTPUT = ".hook_sae_output"


def spliced(model: Any) -> dict[str, torch.nn.Module]:
    """Original hook name -> the SAE-Lens wrapper spliced there (empty for a plain model)."""
    names = [name[: -len(OUTPUT)] for name in getattr(model, "hook_dict", {}) if name.endswith(OUTPUT)]
    return {name: model.get_submodule(name) for name in names}


def hook_name(name: str, wrappers: dict[str, torch.nn.Module]) -> str:
    """Where the value of site ``name`` lives in the model."""
    return name + OUTPUT if name in wrappers else name


@contextmanager
def error_gradients(wrappers: dict[str, torch.nn.Module]) -> Iterator[list[tuple[str, Hook]]]:
    """Hooks to run first in a forward pass so that gradients pass spliced SAEs as in the model.

    For each wrapper with ``use_error_term``: a forward pre-hook records the wrapper's input (the
    model's activation ``a``, and for a transcoder the input it encodes), and the hook at
    ``<name>.hook_sae_output`` adds ``e - e.detach()`` with ``e = a - decode(encode(input))``
    computed with gradients (zero where SAE-Lens bypasses the SAE for special tokens).
    """
    if not wrappers:
        yield []
        return
    from sae_lens.saes.sae import _disable_hooks

    handles: list[torch.utils.hooks.RemovableHandle] = []
    hooks: list[tuple[str, Hook]] = []
    for name, wrapper in wrappers.items():
        if not wrapper.use_error_term:
            continue  # the model uses the reconstruction itself: its gradients are the true ones
        seen: dict[str, Any] = {}

        def record(module: torch.nn.Module, args: tuple, seen: dict[str, Any] = seen) -> None:
            captured = module._captured_input  # a transcoder's input, captured at its input hook
            seen.update(act=args[0], inp=args[0] if captured is None else captured, bypass=module._token_mask)

        def restore(out: torch.Tensor, hook: Any = None, seen: dict[str, Any] = seen, sae: Any = wrapper.sae
                    ) -> torch.Tensor:
            if not torch.is_grad_enabled() or not seen:
                return out
            with _disable_hooks(sae):
                err = seen["act"] - sae.decode(sae.encode(seen["inp"]))  # [batch, pos, ...]
            err = err - err.detach()
            if seen["bypass"] is not None:  # [batch, pos]: the SAE is bypassed there, nothing to restore
                bypass = seen["bypass"]
                err = err.masked_fill(bypass.reshape(bypass.shape + (1,) * (err.ndim - bypass.ndim)), 0)
            return out + err

        handles.append(wrapper.register_forward_pre_hook(record))
        hooks.append((name + OUTPUT, restore))
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()

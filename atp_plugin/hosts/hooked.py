"""The built-in host for TransformerLens 3's ``HookedTransformer`` (and subclasses such as
SAE-Lens's ``HookedSAETransformer``). TransformerLens 4 removed the class: there this host
accepts nothing and the Bridge host serves."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..hookspecs import hookimpl
from . import AttentionGeometry, Hook, spliced
from .tl import TransformerLensHost


def hooked_transformer_class() -> type | None:
    """``HookedTransformer`` where this TransformerLens has it (3.x) and it is loaded, else None
    (4.x removed it; a model of that class cannot exist before its module is imported)."""
    tl = sys.modules.get("transformer_lens")
    if tl is None:
        return None
    try:
        return tl.HookedTransformer
    except (ImportError, AttributeError):
        return None


class HookedTransformerHost(TransformerLensHost):
    """Runs a ``HookedTransformer`` with forward hooks; SAEs spliced into a ``HookedSAETransformer``
    keep the sites of the hooks they replace."""

    name = "HookedTransformer"

    def __init__(self, model: Any):
        super().__init__(model)
        self._geometries: dict[int, AttentionGeometry | str] | None = None  # layer -> geometry, or why not

    @classmethod
    def accepts(cls, model: Any) -> bool:
        hooked = hooked_transformer_class()
        return hooked is not None and isinstance(model, hooked)

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict or name in spliced.spliced(self.model)

    def run(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            hooks: list[tuple[str, Hook]]) -> torch.Tensor:
        wrappers = spliced.spliced(self.model)
        with spliced.error_gradients(wrappers) as first:
            hooks = first + [(spliced.hook_name(name, wrappers), hook) for name, hook in hooks]
            return self.model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks)

    def attention(self, layer: int) -> AttentionGeometry:
        cfg = self.cfg
        unsupported = [
            (cfg.use_logn_attn, "log-n attention scaling"),
            (cfg.use_attention_sinks, "attention sinks"),
            (cfg.positional_embedding_type != "rotary"
             and (cfg.use_qk_norm or cfg.clip_qkv is not None
                  or cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")),
             "q/k normalisation or clipping without rotary (no hook holds the vectors dotted)"),
        ]
        for flag, what in unsupported:
            if flag:
                raise UnsupportedModelError(
                    f"the QK fix cannot handle {what} in this model; use method='atp' or 'atp+gd' "
                    "for attn_q/attn_k nodes, or drop them from nodes="
                )
        if self._geometries is None:  # every layer at once: one check of the patched patterns
            geoms: dict[int, AttentionGeometry | str] = {ly: self._geometry(ly) for ly in range(self.n_layers)}
            geoms.update(self._check_patched_patterns(
                {ly: g for ly, g in geoms.items() if isinstance(g, AttentionGeometry) and g.score_bias is None}))
            self._geometries = geoms
        found = self._geometries[layer]
        if isinstance(found, str):
            raise UnsupportedModelError(found)
        return found

    def _geometry(self, layer: int) -> AttentionGeometry:
        post = "rot_" if self.cfg.positional_embedding_type == "rotary" else ""
        geom = self.geometry(layer, scale=float(self.model.blocks[layer].attn.attn_scale), post=post)
        if self.cfg.positional_embedding_type == "alibi":
            return dataclasses.replace(geom, score_bias="ALiBi (a position bias added to the scores)")
        return geom


@hookimpl
def atp_register_hosts(register):
    register(HookedTransformerHost)

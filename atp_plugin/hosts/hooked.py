"""The built-in host for TransformerLens ``HookedTransformer`` (and subclasses such as
SAE-Lens's ``HookedSAETransformer``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformer_lens import HookedTransformer

from ..hookspecs import hookimpl
from ..tokens import check_known
from . import AttentionGeometry, Hook, SitePosition, spliced

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def kv_heads(cfg: Any) -> int:
    """Key/value heads at ``hook_k``/``hook_v``: fewer than the query heads under grouped-query
    attention, unless the model ungroups them (``ungroup_grouped_query_attention``: a copy per head)."""
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        return cfg.n_heads
    return cfg.n_key_value_heads or cfg.n_heads


class UnsupportedModelError(ValueError):
    """The model uses a variant the engine cannot handle exactly."""


class HookedTransformerHost:
    """Runs a ``HookedTransformer`` with forward hooks."""

    name = "HookedTransformer"

    def __init__(self, model: HookedTransformer):
        self.model = model
        cfg = model.cfg
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.n_kv_heads = kv_heads(cfg)
        self.d_model = cfg.d_model
        self.d_mlp = cfg.d_mlp
        self.d_vocab = cfg.d_vocab
        self.dtype = cfg.dtype
        self.device = next(model.parameters()).device

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return isinstance(model, HookedTransformer)

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict or name in spliced.spliced(self.model)

    def tokenize(self, text: str) -> list[int]:
        if self.model.tokenizer is None:
            raise ValueError("the model has no tokenizer: pass token tensors [N, T] instead of strings")
        # truncate=False: a prompt past n_ctx must reach the length check, not be cut off silently
        ids = self.model.to_tokens(text, prepend_bos=self.cfg.default_prepend_bos, truncate=False)[0].tolist()
        check_known(self.model.tokenizer, text, ids, "the prompt")
        return ids

    def pad_id(self) -> int:
        tok = self.model.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def run(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            hooks: list[tuple[str, Hook]]) -> torch.Tensor:
        wrappers = spliced.spliced(self.model)  # SAEs spliced into a HookedSAETransformer keep their sites
        with spliced.error_gradients(wrappers) as first:
            hooks = first + [(spliced.hook_name(name, wrappers), hook) for name, hook in hooks]
            return self.model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks)

    def site_position(self, hook: str) -> SitePosition:
        m = _BLOCK.match(hook)
        if m is None:
            if hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
                return SitePosition(0, on_resid=True)
            return SitePosition(self.n_layers, on_resid=True)  # ln_final and later: above every layer
        layer, rest = int(m.group(1)), m.group(2)
        if rest in ("hook_resid_pre", "hook_resid_mid"):
            return SitePosition(layer, on_resid=True)
        if rest == "hook_resid_post":
            return SitePosition(layer + 1, on_resid=True)
        return SitePosition(layer, on_resid=False)

    def resid_hooks(self, layer: int) -> tuple[str, str]:
        return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"

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
        attn = self.model.blocks[layer].attn
        post = "rot_" if cfg.positional_embedding_type == "rotary" else ""
        return AttentionGeometry(
            q_hook=f"blocks.{layer}.attn.hook_{post}q",
            k_hook=f"blocks.{layer}.attn.hook_{post}k",
            scores_hook=f"blocks.{layer}.attn.hook_attn_scores",
            pattern_hook=f"blocks.{layer}.attn.hook_pattern",
            scale=float(attn.attn_scale),
            softcap=cfg.attn_scores_soft_cap if cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0 else None,
            group=self.n_heads // self.n_kv_heads,
        )


@hookimpl
def atp_register_hosts(register):
    register(HookedTransformerHost)

"""What every TransformerLens model object shares: hook names, where hooks sit relative to the
residual stream, tokenization, padding and the width of each hook's value.

``HookedTransformer`` (TransformerLens 3) and ``TransformerBridge`` in compatibility mode
(TransformerLens 3 and 4) expose the same hook names and config fields, so their hosts differ only
in how they run the model and how they learn each layer's attention geometry. Nothing here imports
``transformer_lens``: this module loads under either major version.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError
from ..tokens import check_known
from . import AttentionGeometry, Hook, SitePosition

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def kv_heads(cfg: Any) -> int:
    """Key/value heads at ``hook_k``/``hook_v``: fewer than the query heads under grouped-query
    attention, unless the model ungroups them (``ungroup_grouped_query_attention``: a copy per head)."""
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        return cfg.n_heads
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


#: Trailing shape of a hook's value ``[batch, pos, ...]`` by the hook's last name, from the config.
_SHAPES: dict[str, Callable[[Any], tuple[int, ...]]] = {
    **{h: lambda c: (c.d_model,) for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                            "hook_attn_out", "hook_mlp_out", "hook_embed", "hook_pos_embed")},
    **{h: lambda c: (c.n_heads, c.d_head) for h in ("hook_q", "hook_rot_q", "hook_z")},
    **{h: lambda c: (kv_heads(c), c.d_head) for h in ("hook_k", "hook_rot_k", "hook_v")},
    **{h: lambda c: (c.d_mlp,) for h in ("hook_pre", "hook_pre_linear", "hook_post")},
}


class TransformerLensHost:
    """The parts of a host that read only TransformerLens's hook names and config."""

    name = "TransformerLens"

    def __init__(self, model: Any):
        if any(p.is_meta for p in model.parameters()):
            raise UnsupportedModelError(
                "the model's weights are on the 'meta' device (shapes only, no values), so nothing can be computed; "
                "load real weights first (e.g. model.to_empty(device='cpu') and load a state dict, or load it "
                "without device='meta')")
        self.model = model
        self.cfg = model.cfg
        self.n_layers: int = self.cfg.n_layers
        self.n_heads: int = self.cfg.n_heads
        self.n_kv_heads: int = kv_heads(self.cfg)
        self.d_vocab: int = self.cfg.d_vocab
        self.dtype: torch.dtype = self.cfg.dtype
        self.device: torch.device = next(model.parameters()).device
        # positions the model can see; None where nothing limits them (ALiBi)
        self.n_ctx: int | None = None if getattr(self.cfg, "positional_embedding_type", None) == "alibi" \
            else getattr(self.cfg, "n_ctx", None)

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict

    def act_shape(self, hook: str) -> tuple[int, ...] | None:
        """The trailing shape of ``hook``'s value after ``[batch, pos]``, or None where unknown."""
        shape = _SHAPES.get(hook.rsplit(".", 1)[-1])
        return shape(self.cfg) if shape is not None else None

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
        raise NotImplementedError

    def geometry(self, layer: int, *, scale: float, post: str) -> AttentionGeometry:
        """Layer ``layer``'s geometry with the given score ``scale``; ``post`` is ``"rot_"`` where q
        and k are dotted after rotary."""
        cap = getattr(self.cfg, "attn_scores_soft_cap", None)
        return AttentionGeometry(
            q_hook=f"blocks.{layer}.attn.hook_{post}q", k_hook=f"blocks.{layer}.attn.hook_{post}k",
            scores_hook=f"blocks.{layer}.attn.hook_attn_scores", pattern_hook=f"blocks.{layer}.attn.hook_pattern",
            v_hook=f"blocks.{layer}.attn.hook_v", z_hook=f"blocks.{layer}.attn.hook_z",
            scale=scale, softcap=float(cap) if cap is not None and cap > 0 else None,
            group=self.n_heads // self.n_kv_heads)

"""The benchmarks' random inputs: GPT-2-style HookedTransformers with random float32 weights (W_Q
and W_K doubled so attention patterns are not uniform, as in a trained model) and random token pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # HookedTransformer is imported when a model is built (TransformerLens 3 only)
    from transformer_lens import HookedTransformer


def random_pairs(n: int, t: int, d_vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` token-aligned pairs of ``t`` random tokens drawn from ``g``; corrupt differs at about a
    quarter of the positions."""
    clean = torch.randint(0, d_vocab, (n, t), generator=g)
    corrupt = clean.clone()
    change = torch.rand(n, t, generator=g) < 0.25
    corrupt[change] = torch.randint(0, d_vocab, (int(change.sum()),), generator=g)
    return clean, corrupt


def random_model(*, n_layers: int, d_model: int, n_heads: int, d_mlp: int, d_vocab: int, n_ctx: int,
                 seed: int = 0) -> HookedTransformer:
    """A LayerNorm + GELU model of this shape (d_head = d_model / n_heads) in eval mode."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                                  d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu",
                                  normalization_type="LN", dtype=torch.float32, seed=seed, default_prepend_bos=False)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(2.0)
            block.attn.W_K.mul_(2.0)
    return model.eval()

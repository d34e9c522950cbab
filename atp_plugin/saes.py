"""SAE-shaped modules that need no SAE-Lens: what ``SAEFeatures`` accepts besides SAE-Lens SAEs.

``SAEFeatures`` takes any object with ``encode(x) -> features``, ``decode(features) -> x`` and a
decoder ``W_dec`` ``[d_sae, d_in]``, plus the hook it reads (``hook=``): an SAE from another library
(EleutherAI's sparsify, dictionary-learning), a user's own ``nn.Module``, or ``TopKSAE`` below,
which reads SAE-Lens's top-k save format so the bundled demo SAE loads under TransformerLens 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class TopKSAE(torch.nn.Module):
    """A top-k SAE: ``f = scatter(topk(ReLU((x - b_dec) W_enc + b_enc), k))``, ``x^ = f W_dec + b_dec``
    (SAE-Lens's ``topk`` architecture with ``apply_b_dec_to_input`` and no activation normalisation).

    Shapes: ``W_enc`` ``[d_in, d_sae]``, ``W_dec`` ``[d_sae, d_in]``.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, k: int,
                 hook_name: str):
        super().__init__()
        self.W_enc, self.b_enc = torch.nn.Parameter(W_enc), torch.nn.Parameter(b_enc)
        self.W_dec, self.b_dec = torch.nn.Parameter(W_dec), torch.nn.Parameter(b_dec)
        self.k, self.hook_name = k, hook_name

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TopKSAE:
        """Read a directory in SAE-Lens's format (``cfg.json``, ``sae_weights.safetensors``) of a
        top-k SAE; other architectures are refused by name."""
        cfg = json.loads((Path(path) / "cfg.json").read_text())
        arch = cfg.get("architecture")
        unsupported = [(arch != "topk", f"architecture {arch!r}"),
                       (cfg.get("normalize_activations", "none") != "none", "activation normalisation"),
                       (bool(cfg.get("rescale_acts_by_decoder_norm")), "decoder-norm rescaling"),
                       (not cfg.get("apply_b_dec_to_input", True), "apply_b_dec_to_input=False")]
        for flag, what in unsupported:
            if flag:
                raise ValueError(f"TopKSAE reads plain top-k SAEs, not {what}; load this SAE with SAE-Lens "
                                 "(pip install 'atp-plugin[sae]')")
        w = {name: t.to(device=device, dtype=dtype) for name, t in
             load_file(str(Path(path) / "sae_weights.safetensors")).items()}
        return cls(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], int(cfg["k"]), cfg["metadata"]["hook_name"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of activations ``[..., d_in]``: the k largest pre-activations, ReLU'd."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # [..., d_sae]
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_in]`` of features ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec

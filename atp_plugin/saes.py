"""SAE-shaped modules that need no SAE-Lens: what ``SAEFeatures`` and ``TranscoderFeatures`` accept
besides SAE-Lens's classes.

An *SAE-shaped* object has ``encode(x) -> f`` (dense features ``[..., d_sae]``), ``decode(f) -> x^``
(``[..., d_out]``, differentiable in ``f``) and a decoder ``W_dec`` ``[d_sae, d_out]``; the hook it
reads is given by the user (``hook=``, or ``hook_in=`` / ``hook_out=`` for a transcoder), or named by
its ``hook_name`` (and ``hook_name_out``). That covers a user's own ``nn.Module`` and these:

- ``TopKSAE``: reads SAE-Lens's top-k save format, so the bundled demo SAE loads under
  TransformerLens 4 (no SAE-Lens there);
- ``SimpleSAE``: an SAE or transcoder from bare weights ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``
  and an activation function (``torch.relu``, ``TopK(k)``, your own);
- ``SparsifySAE``: EleutherAI's sparsify (``pip install eai-sparsify``), whose ``encode`` returns
  the top-k activations and their indices rather than dense features; ``SAEFeatures`` and
  ``TranscoderFeatures`` wrap a sparsify ``SparseCoder`` (``Sae``) in it by themselves
  (``as_sae_shaped``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11


def top_k(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k activation: the ``k`` largest pre-activations of each position (last dim), ReLU'd, at
    their own indices; every other entry 0. ``pre`` ``[..., d_sae]`` -> features ``[..., d_sae]``, the same shape.

    The same as ReLU then top-k (a value the ReLU zeroes stays zero either way); differentiable in
    the kept entries (``scatter`` of ``relu(topk(pre).values)``)."""
    top = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


class TopK(torch.nn.Module):
    """The top-k activation as a module, for ``SimpleSAE(..., activation=TopK(k))``: keeps the ``k``
    largest pre-activations of each position after ReLU and zeroes the rest (``TopKSAE``'s encoder
    nonlinearity; see :func:`top_k`). No parameters."""

    def __init__(self, k: int):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK takes a positive int k (active features per position), got {k!r}")
        self.k = k

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of pre-activations ``[..., d_sae]``."""
        if pre.shape[-1] < self.k:
            raise ValueError(f"TopK(k={self.k}) needs at least k features per position, got {pre.shape[-1]}")
        return top_k(pre, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


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
        return top_k((x - self.b_dec) @ self.W_enc + self.b_enc, self.k)  # [..., d_sae]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_in]`` of features ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec


class SimpleSAE(torch.nn.Module):
    """An SAE or transcoder from bare weights: ``f = activation((x - b_dec) W_enc + b_enc)`` (``- b_dec``
    only with ``subtract_b_dec``), ``x^ = f W_dec + b_dec``.

    Shapes: ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_out]``, ``b_dec``
    ``[d_out]``; ``d_out == d_in`` for an SAE, either for a transcoder. ``activation`` maps
    pre-activations ``[..., d_sae]`` to features of the same shape (``torch.relu``, a JumpReLU, a
    top-k, ...). For weights trained elsewhere that come without an ``encode``/``decode`` of their own.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu, hook_name: str | None = None,
                 *, hook_name_out: str | None = None, subtract_b_dec: bool = False):
        super().__init__()
        if W_enc.ndim != 2 or W_dec.ndim != 2 or W_enc.shape[1] != W_dec.shape[0] \
                or tuple(b_enc.shape) != (W_dec.shape[0],) or tuple(b_dec.shape) != (W_dec.shape[-1],):
            got = ", ".join(f"{n} {list(t.shape)}" for n, t in
                            (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)))
            raise ValueError(f"SimpleSAE takes W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], "
                             f"b_dec [d_out]; got {got} (weights stored as torch.nn.Linear stores them, "
                             "[out, in], need a .T)")
        if subtract_b_dec and W_enc.shape[0] != W_dec.shape[1]:
            raise ValueError("subtract_b_dec needs d_in == d_out (b_dec lives in the output space)")
        self.W_enc, self.b_enc = torch.nn.Parameter(W_enc), torch.nn.Parameter(b_enc)
        self.W_dec, self.b_dec = torch.nn.Parameter(W_dec), torch.nn.Parameter(b_dec)
        self.activation, self.subtract_b_dec = activation, subtract_b_dec
        self.hook_name, self.hook_name_out = hook_name, hook_name_out

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., d_sae]`` of inputs ``[..., d_in]``."""
        if self.subtract_b_dec:
            x = x - self.b_dec
        return self.activation(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The output ``[..., d_out]`` of features ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec


class SparsifySAE(torch.nn.Module):
    """An EleutherAI sparsify ``SparseCoder`` (``Sae``; a transcoder when ``cfg.transcode``), SAE-shaped.

    sparsify's ``encode(x)`` returns ``EncoderOutput(top_acts, top_indices, pre_acts)`` and its
    ``decode(top_acts, top_indices)`` takes the same sparse pair, on 2-d inputs only. Here:
    ``encode(x)`` is dense, ``[..., num_latents]``, ``top_acts`` scattered at ``top_indices``
    (zeros elsewhere), computed by sparsify's own ``encode``; ``decode(f) = f W_dec + b_dec``, which
    is sparsify's ``decode`` (``sum_j top_acts_j W_dec[top_indices_j] + b_dec``) written densely so
    that it takes any ``f`` (a patched feature adds one active latent) and gives ``dL/df`` for
    every latent, active or not. Inputs are cast to the coder's dtype, as sparsify's
    ``decode`` casts its activations. A ``W_skip`` term (``skip_connection``) is not part of
    sparsify's ``decode``: ``SAEFeatures`` / ``TranscoderFeatures`` count it in the error node, which
    a feature's patch leaves unchanged (its input does not move).

    sparsify names its sites by Hugging Face module (``hookpoint`` ``"layers.3"``, the output of
    decoder layer 3, i.e. TransformerLens's ``blocks.3.hook_resid_post``): give the TransformerLens
    hook yourself, ``hook_name`` here or ``hook=`` / ``hook_in=``, ``hook_out=`` to the adapter.
    """

    def __init__(self, coder: Any, hook_name: str | None = None, *, hook_name_out: str | None = None):
        super().__init__()
        if not _is_sparsify(coder):
            raise TypeError(f"SparsifySAE wraps a sparsify SparseCoder (sparsify.Sae), got {type(coder).__name__}")
        if coder.W_dec is None:
            raise ValueError("this sparsify coder has no decoder (loaded with decoder=False): load it with "
                             "decoder=True; its features are patched through W_dec")
        self.coder = coder
        self.hook_name, self.hook_name_out = hook_name, hook_name_out

    @property
    def W_dec(self) -> torch.Tensor:
        """The decoder ``[num_latents, d_out]`` (sparsify's own layout)."""
        return self.coder.W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        return self.coder.b_dec

    @property
    def d_in(self) -> int:
        return int(self.coder.d_in)

    @property
    def transcode(self) -> bool:
        """Whether the coder is a transcoder (reads a module's input, predicts its output)."""
        return bool(self.coder.cfg.transcode)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``[..., num_latents]`` of inputs ``[..., d_in]`` (sparsify's top-k, scattered)."""
        rows = x.reshape(-1, x.shape[-1]).to(self.coder.dtype)
        out = self.coder.encode(rows)
        f = torch.zeros(rows.shape[0], self.W_dec.shape[0], dtype=out.top_acts.dtype, device=rows.device)
        return f.scatter(-1, out.top_indices, out.top_acts).reshape(*x.shape[:-1], -1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The output ``[..., d_out]`` of dense features ``[..., num_latents]``."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def load_topk_transcoder(directory: Traversable | str | Path, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> SimpleSAE:
    """A top-k transcoder saved as the bundled demo transcoders are (``cfg.json`` with architecture
    ``"topk_transcoder"``, ``d_in``, ``d_sae``, ``d_out``, ``k``, ``hook_name``, ``hook_name_out``;
    ``weights.safetensors`` with ``W_enc`` ``[d_in, d_sae]``, ``b_enc``, ``W_dec`` ``[d_sae, d_out]``,
    ``b_dec``), as a ``SimpleSAE`` with ``activation=TopK(k)``, in eval mode."""
    directory = Path(directory) if isinstance(directory, str) else directory
    cfg = json.loads(directory.joinpath("cfg.json").read_text())
    if cfg.get("architecture") != "topk_transcoder":
        raise ValueError(f"{directory} holds a {cfg.get('architecture')!r}, not a top-k transcoder")
    w = {name: t.to(device=device, dtype=dtype)
         for name, t in load_safetensors(directory.joinpath("weights.safetensors").read_bytes()).items()}
    if tuple(w["W_enc"].shape) != (cfg["d_in"], cfg["d_sae"]) or \
            tuple(w["W_dec"].shape) != (cfg["d_sae"], cfg["d_out"]):
        raise ValueError(f"{directory}: weights do not match cfg.json's d_in, d_sae, d_out")
    tc = SimpleSAE(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], TopK(int(cfg["k"])), cfg["hook_name"],
                   hook_name_out=cfg["hook_name_out"])
    return tc.eval()


def load_dictionary(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """An SAE or transcoder saved in directory ``path``: the bundled demo transcoders' format
    (``load_topk_transcoder``); SAE-Lens's format, read by SAE-Lens where it is installed; a plain
    top-k SAE in SAE-Lens's format (``TopKSAE.load``) where it is not."""
    cfg = json.loads((Path(path) / "cfg.json").read_text())
    if cfg.get("architecture") == "topk_transcoder":
        return load_topk_transcoder(path, device, dtype)
    try:
        from sae_lens import SAE
    except ImportError:
        return TopKSAE.load(path, dtype, device)
    return SAE.load_from_disk(str(path), device=device, dtype=str(dtype).removeprefix("torch.")).eval()


def _is_sparsify(obj: Any) -> bool:
    """Whether ``obj`` is a sparsify ``SparseCoder`` (without importing sparsify, which may be absent)."""
    return type(obj).__module__.startswith("sparsify.") and hasattr(obj, "num_latents")


def as_sae_shaped(obj: Any) -> Any:
    """``obj`` itself where it is SAE-shaped already; a sparsify ``SparseCoder`` wrapped in ``SparsifySAE``."""
    return SparsifySAE(obj) if _is_sparsify(obj) else obj

"""The host capability edges need: what the edge engine reads from a model besides hooks (weights,
norms, the MLP of a layer), answered for TransformerLens models.

A host offers it through ``structure()`` (optional: a host without it serves node methods, and
edges refuse it with one clear error). The TransformerLens hosts read it from ``host.model``
(``HookedTransformer`` and ``TransformerBridge`` in compatibility mode both expose
``blocks[l].attn.W_Q`` / ``b_Q`` / ``W_O``, ``blocks[l].ln1`` / ``ln2`` / ``mlp`` and ``cfg``); this
module is the only place outside the hosts' own runs that looks inside a model. Edges need three
things nodes do not: a head's write to the residual (``z @ W_O``, so
per-head result hooks never have to be switched on), a head's query/key/value recomputed from a
changed residual (``ln1(x) @ W + b``, for exact edge patching and the QK fix), and an MLP
recomputed from a changed residual (``mlp(ln2(x))``). ``check_structure`` verifies on a real run
that these recomputations reproduce the model's own values before any number is reported.

Post-norm blocks (Gemma 2 and 3: a norm before and after attention and MLP; OLMo 2: after only) add
``ln1_post(attention output)`` and ``ln2_post(mlp output)`` to the residual: the heads' writes are
then not additive, and ``attn_write`` / ``attn_write_jvp`` give the normalised write of a changed
attention output and its first-order form. A block without a pre-norm reads the residual as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError
from . import Host, Rotation, rounding

_NORMS = ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre")  # TransformerLens's, closed-form Jacobians


@dataclass(frozen=True)
class NormStats:
    """A closed-form norm at one input: ``normed`` x^ ``[batch, pos, d_model]`` and ``scale``
    ``[batch, pos, 1]`` (None for no norm), its weight ``w`` ``[d_model]`` (None: 1), and whether
    it centres (LayerNorm) or not (RMSNorm)."""

    normed: torch.Tensor | None
    scale: torch.Tensor | None
    w: torch.Tensor | None
    centred: bool


@dataclass(frozen=True)
class Structure:
    """The pieces of ``host.model`` the edge engine uses; ``n_kv`` as the host counts kv-heads."""

    host: Host
    n_layers: int
    n_heads: int
    n_kv: int
    d_model: int
    attn_only: bool
    parallel: bool
    rotary: bool

    @property
    def model(self) -> Any:
        return self.host.model

    def block(self, layer: int) -> Any:
        return self.model.blocks[layer]

    def _norm(self, layer: int, name: str) -> Any:
        """The block's norm module ``name`` (``ln1``, ``ln2``, ``ln1_post``, ``ln2_post``), None where it has none."""
        return getattr(self.block(layer), name, None)

    def ln1(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The layer's attention input norm applied to ``x`` ``[..., d_model]`` as the model applies it
        (``x`` itself in a block without one)."""
        ln = self._norm(layer, "ln1")
        return x if ln is None else ln(x)

    def post_normed(self, layer: int) -> bool:
        """Whether the layer's attention output passes through a norm before it joins the residual."""
        return self._norm(layer, "ln1_post") is not None

    def attn_output(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The attention output before any post-norm, ``z @ W_O + b_O`` ``[batch, pos, d_model]``,
        from the heads' outputs ``z`` ``[batch, pos, head, d_head]`` (in ``z``'s dtype)."""
        b_O = self.b_O(layer)
        a = torch.einsum("bthe,hed->btd", z, self.W_O(layer).to(z.dtype))
        return a if b_O is None else a + b_O.to(z.dtype)

    def attn_write(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """What the layer's attention adds to the residual when its output (``z @ W_O + b_O``) is
        ``a`` ``[..., d_model]``: ``ln1_post(a)``, or ``a`` itself without a post-norm."""
        ln = self._norm(layer, "ln1_post")
        return a if ln is None else ln(a)

    def attn_write_jvp(self, layer: int, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The first-order change of ``attn_write`` at ``a`` ``[batch, pos, d_model]`` along each of
        the changes ``d`` ``[batch, pos, n, d_model]``: J(a) d, ``d``'s shape and dtype (``d`` itself
        without a post-norm). By autograd through the model's own norm module (a double backward)."""
        if not self.post_normed(layer):
            return d
        with torch.enable_grad():
            x = a.detach()[:, :, None].expand(d.shape).to(self.host.dtype).requires_grad_(True)
            y = self.attn_write(layer, x)
            u = torch.zeros_like(y, requires_grad=True)
            (gx,) = torch.autograd.grad(y, x, u, create_graph=True)
            (out,) = torch.autograd.grad(gx, u, d.to(gx.dtype))
        return out.to(d.dtype)

    def ln1_stats(self, layer: int, x: torch.Tensor, dtype: torch.dtype) -> NormStats | None:
        """ln1 at ``x`` ``[batch, pos, d_model]`` as its Jacobian needs it, for TransformerLens's own
        norms (their forward: x - mean for LayerNorm, scale = sqrt(mean(x^2) + eps), x / scale, times
        w; ``nn.Identity`` without one); None for any other module."""
        ln = self._norm(layer, "ln1")
        if ln is None:
            return NormStats(None, None, None, False)
        kind = type(ln).__name__ if type(ln).__module__.startswith(("transformer_lens.components", "torch.nn")) else ""
        if kind == "Identity":
            return NormStats(None, None, None, False)
        if kind not in _NORMS:
            return None
        centred = kind.startswith("LayerNorm")
        x = x.to(dtype)
        x = x - x.mean(-1, keepdim=True) if centred else x
        scale = (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        return NormStats(x / scale, scale, ln.w.to(dtype) if hasattr(ln, "w") else None, centred)

    def ln1_vjp(self, layer: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """dL/dx from dL/d(ln1(x)) for several cotangents at once: ``x`` ``[batch, pos, d_model]``,
        ``g`` ``[batch, pos, reads, d_model]`` -> ``[batch, pos, reads, d_model]`` (in ``g``'s dtype):
        (gw - x^ mean(gw x^) [- mean(gw) for LayerNorm]) / scale in closed form (``ln1_stats``); any
        other norm module by autograd, the forward once and the cotangents batched."""
        st = self.ln1_stats(layer, x, g.dtype)
        if st is not None:
            gw = g if st.w is None else g * st.w
            if st.scale is None or st.normed is None:
                return gw
            normed = st.normed[:, :, None]
            out = gw - normed * (gw * normed).mean(-1, keepdim=True)
            return (out - gw.mean(-1, keepdim=True) if st.centred else out) / st.scale[:, :, None]
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            (out,) = torch.autograd.grad(self.ln1(layer, xs), xs, grad_outputs=g.permute(2, 0, 1, 3).to(xs.dtype),
                                         is_grads_batched=True)
        return out.permute(1, 2, 0, 3).to(g.dtype)

    def mlp_of(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP output at ``hook_mlp_out`` for the residual ``x`` ``[batch, pos, d_model]``
        (its norms, before and after, included)."""
        ln2 = self._norm(layer, "ln2")
        return self._mlp_out(layer, x if ln2 is None else ln2(x))

    def _mlp_out(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """``ln2_post(mlp(normed))`` from the MLP's normalised input (``ln2_post`` where the block has it)."""
        out = self.block(layer).mlp(normed)
        post = self._norm(layer, "ln2_post")
        return out if post is None else post(out)

    def mlp_hooks(self, layer: int) -> tuple[str, ...]:
        """The MLP block's hooks ``mlp_sites`` gives values of: the residual it reads
        (``hook_resid_mid``, ``hook_resid_pre`` in a parallel block, and ``hook_mlp_in``, its copy),
        ln2's normalised input (``ln2.hook_normalized``: before ln2's weight and bias, as
        TransformerLens hooks it) and the MLP's output (``hook_mlp_out``)."""
        h = hook_names(layer)
        return (h.resid_pre if self.parallel else h.resid_mid, f"blocks.{layer}.hook_mlp_in",
                f"blocks.{layer}.ln2.hook_normalized", h.mlp_out)

    def mlp_sites(self, layer: int, x: torch.Tensor, output: bool = True) -> dict[str, torch.Tensor]:
        """The values of ``mlp_hooks`` for the residual ``x`` ``[batch, pos, d_model]`` the MLP reads
        (ln2's normalised input as its ``hook_normalized`` module sees it in this forward); without
        ``output``, all but the MLP's output (the MLP is not run)."""
        ln2 = self._norm(layer, "ln2")
        point = getattr(ln2, "hook_normalized", None)
        seen: list[torch.Tensor] = []
        handle = point.register_forward_hook(lambda m, i, out: seen.append(out)) \
            if isinstance(point, torch.nn.Module) else None
        try:
            normed = x if ln2 is None else ln2(x)
        finally:
            if handle is not None:
                handle.remove()
        resid, copy, normalized, mlp_out = self.mlp_hooks(layer)
        return ({resid: x, copy: x} | ({normalized: seen[0]} if seen else {})
                | ({mlp_out: self._mlp_out(layer, normed)} if output else {}))

    def weights(self, layer: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)`` of the layer's ``"q"``, ``"k"`` or ``"v"`` projection: ``[heads, d_model, d_head]``,
        ``[heads, d_head]`` with heads = n_heads for q and n_kv for k/v (the stored kv-heads under
        grouped-query attention, one copy per query head where the model ungroups them)."""
        attn = self.block(layer).attn
        name = which.upper()
        w, b = getattr(attn, f"W_{name}"), getattr(attn, f"b_{name}", None)
        if which != "q" and self.n_kv != self.n_heads and getattr(attn, f"_W_{name}", None) is not None:
            w, b = getattr(attn, f"_W_{name}"), getattr(attn, f"_b_{name}", None)  # the stored kv-heads
        return w, torch.zeros(w.shape[0], w.shape[2], dtype=w.dtype, device=w.device) if b is None else b

    def project(self, layer: int, which: str, normed: torch.Tensor) -> torch.Tensor:
        """q/k/v of every head from normed inputs ``[batch, pos, heads, d_model]``: ``[batch, pos, heads, d_head]``."""
        w, b = self.weights(layer, which)
        return torch.einsum("bphd,hde->bphe", normed, w.to(normed.dtype)) + b.to(normed.dtype)

    def W_O(self, layer: int) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``."""
        return self.block(layer).attn.W_O

    def b_O(self, layer: int) -> torch.Tensor | None:
        """The attention output bias ``[d_model]`` (None where the model has none, as a Bridge's Llama)."""
        return self.block(layer).attn.b_O

    def ln1_bias(self, layer: int) -> torch.Tensor | None:
        """ln1's additive bias ``[d_model]`` (None for RMSNorm and folded norms)."""
        return getattr(self._norm(layer, "ln1"), "b", None)

    def rotation(self, layer: int) -> Rotation | None:
        """The host's rotation of changed q/k vectors with the cos and sin one run used (a
        TransformerBridge's ``hook_cos``/``hook_sin``), where it offers one."""
        get = getattr(self.host, "rotation", None)
        return get(layer) if self.rotary and get is not None else None

    def rotation_hooks(self) -> set[str]:
        """The hooks every layer's ``rotation`` reads (capture them in the run whose values ``rotate`` gets)."""
        rotations = [self.rotation(layer) for layer in range(self.n_layers)]
        return {h for r in rotations if r is not None for h in r.reads}

    def check_qk(self, layer: int) -> None:
        """Fail unless the edge QK fix can recompute the layer's dotted q/k from a changed residual:
        ln1, the projection and the rotary embedding (if any), with no q/k norm in between."""
        attn = self.block(layer).attn
        if any(getattr(attn, n, None) is not None for n in ("q_norm", "k_norm", "q_ln", "k_ln")):
            raise UnsupportedModelError("the QK fix for edges cannot follow the q/k norm this model applies between "
                                        "the projection and the scores (e.g. Qwen 3, Gemma 3, OLMo 2); use "
                                        "method='atp' for edges")
        if self.rotary and self.rotation(layer) is None and not hasattr(attn, "apply_rotary"):
            raise UnsupportedModelError("the QK fix for edges needs the attention's rotary embedding for changed "
                                        "queries and keys (HookedTransformer's apply_rotary, or a TransformerBridge's "
                                        "hook_cos/hook_sin with halves rotated); use method='atp' for this model")

    def rotate(self, layer: int, x: torch.Tensor, mask: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rotary embedding of q or k vectors ``[..., batch, pos, heads, d_head]`` (identity without
        rotary), as the model rotated them in the run whose hook values are ``values`` (``mask``:
        its attention mask ``[batch, pos]``). Linear in ``x``."""
        if not self.rotary:
            return x
        rotation = self.rotation(layer)
        if rotation is not None:
            return rotation.apply(x, values).to(x.dtype)
        self.check_qk(layer)
        lead = x.shape[:-4]
        flat = x.reshape(-1, *x.shape[-3:])  # [lead * batch, pos, heads, d_head]
        attention = None if bool(mask.all()) else mask.long().repeat(flat.shape[0] // mask.shape[0], 1)
        return self.block(layer).attn.apply_rotary(flat, 0, attention).to(x.dtype).reshape(*lead, *x.shape[-4:])


def structure_of(host: Host) -> Structure:
    """The model's parts, or a clear error for architectures whose residual writes are not the
    (post-normed) attention output ``z @ W_O + b_O`` and ``mlp_out`` added as they are (q/k norms
    in a HookedTransformer, shortformer embeddings, per-head attention inputs)."""
    cfg = host.model.cfg
    block = host.model.blocks[0]
    if getattr(cfg, "use_normalization_before_and_after", False) and not hasattr(block, "ln1_post"):
        raise UnsupportedModelError("edge attribution cannot find this model's norms after attention and MLP "
                                    "(use_normalization_before_and_after without blocks[l].ln1_post); node methods "
                                    "(attribute()) serve it")
    unsupported = [
        (getattr(cfg, "use_qk_norm", False), "q/k normalisation"),
        (getattr(cfg, "positional_embedding_type", "standard") == "shortformer", "shortformer positional embeddings"),
        (getattr(cfg, "use_attn_in", False) or getattr(cfg, "use_split_qkv_input", False),
         "per-head attention inputs switched on (use_attn_in / use_split_qkv_input)"),
    ]
    for flag, what in unsupported:
        if flag:
            raise UnsupportedModelError(f"edge attribution cannot handle {what} in this model; node methods "
                                        "(attribute()) serve it")
    return Structure(host=host, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv=host.n_kv_heads, d_model=cfg.d_model,
                 attn_only=bool(cfg.attn_only), parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
                 rotary=getattr(cfg, "positional_embedding_type", "standard") == "rotary")


def check_structure(parts: Structure, values: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """Check on one run's values (every layer's resid_pre/mid/post, q, k, v, z and MLP output) that
    the recomputations the edge engine relies on reproduce the model: q/k/v from ``ln1(resid_pre)``, the MLP output from
    ``ln2_post(mlp(ln2(resid)))``, and the residual as the sum of embedding, (post-normed)
    attention outputs and MLP writes. Relative tolerance 1e-9 in float64, 1e-4 in float32, 3e-2 in half precision;
    padding positions skipped."""
    tol = rounding(parts.host.dtype)
    real = mask[:, :, None]

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        got, want = got.double(), want.double()
        m = real.reshape(real.shape + (1,) * (want.ndim - 3))
        err = float(((got - want) * m).abs().max()) / max(float((want * m).abs().max()), 1e-30)
        if not err <= tol:
            raise UnsupportedModelError(
                f"this model's {what} is not what the edge engine recomputes (relative mismatch {err:.2g}); "
                "edges need q/k/v = ln1(resid) @ W + b, MLP out = ln2_post(mlp(ln2(resid))) and residual writes "
                "ln1_post(z @ W_O + b_O) and mlp_out added as they are (each norm where the block has it)")

    with torch.no_grad():
        for layer in range(parts.n_layers):
            h = hook_names(layer)
            x = values[h.resid_pre]
            for which in "qkv":
                heads = parts.n_heads if which == "q" else parts.n_kv
                normed = parts.ln1(layer, x)[:, :, None].expand(-1, -1, heads, -1)
                close(parts.project(layer, which, normed), values[h.qkv(which)], f"layer {layer} hook_{which}")
            after = x + parts.attn_write(layer, parts.attn_output(layer, values[h.z]))
            if not parts.attn_only:
                mlp_in = x if parts.parallel else after
                close(parts.mlp_of(layer, mlp_in), values[h.mlp_out], f"layer {layer} MLP output")
                after = after + values[h.mlp_out]
            close(after, values[h.resid_post], f"layer {layer} residual (resid_pre + head writes + MLP out)")


@dataclass(frozen=True)
class LayerHooks:
    """Hook names of one layer the edge engine reads or patches."""

    layer: int

    @property
    def resid_pre(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def resid_mid(self) -> str:
        return f"blocks.{self.layer}.hook_resid_mid"

    @property
    def resid_post(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    @property
    def z(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    @property
    def mlp_out(self) -> str:
        return f"blocks.{self.layer}.hook_mlp_out"

    def qkv(self, which: str) -> str:
        return f"blocks.{self.layer}.attn.hook_{which}"


def hook_names(layer: int) -> LayerHooks:
    return LayerHooks(layer)

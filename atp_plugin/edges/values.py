"""Sender writes and receiver gradients from one run's hook values.

A sender's write is what it adds to the residual stream (the embedding, ``z_h @ W_O[h]``, an MLP's
output); a receiver's gradient is dL/d(the residual as that receiver alone reads it):

* a head's query/key/value input: dL/d(hook_q/k/v of that head) pulled back through ``W`` and the
  Jacobian of ``ln1`` at the run's residual (``Structure.ln1_vjp``);
* an MLP's input: dL/d(resid_mid) - dL/d(resid_post) in a sequential block (resid_post =
  resid_mid + mlp_out); dL/d(resid_pre) - dL/d(resid_post) minus the layer's attention reads in a
  parallel block (resid_post = resid_pre + attn_out + mlp_out);
* the logits: dL/d(the last resid_post), what ``ln_final`` reads.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..hosts.structure import NormStats, Structure, hook_names
from .graph import Graph


def sender_hooks(parts: Structure) -> set[str]:
    """Hooks holding every sender's write."""
    out = {hook_names(0).resid_pre}
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        out.add(h.z)
        if not parts.attn_only:
            out.add(h.mlp_out)
    return out


def receiver_hooks(parts: Structure) -> set[str]:
    """Hooks whose values and gradients give every receiver's gradient."""
    out = set()
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        out |= {h.resid_pre, h.resid_post, h.qkv("q"), h.qkv("k"), h.qkv("v")}
        if not parts.attn_only and not parts.parallel:
            out.add(h.resid_mid)
    return out


def head_writes(parts: Structure, layer: int, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each head's write ``z_h @ W_O[h]``: ``[batch, pos, head, d_model]`` from z ``[batch, pos, head, d_head]``."""
    return torch.einsum("bthe,hed->bthd", z.to(dtype), parts.W_O(layer).to(dtype))


def sender_writes(parts: Structure, values: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Every sender's write, in graph order: ``[batch, pos, sender, d_model]``."""
    writes = [values[hook_names(0).resid_pre].to(dtype)[:, :, None]]
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        writes.append(head_writes(parts, layer, values[h.z], dtype))
        if not parts.attn_only:
            writes.append(values[h.mlp_out].to(dtype)[:, :, None])
    return torch.cat(writes, dim=2)


def attention_reads(parts: Structure, layer: int, x: torch.Tensor, grads: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """dL/d(residual ``x`` ``[batch, pos, d_model]`` as each q, k and v input of the layer reads it):
    ``[batch, pos, n_heads + 2 n_kv, d_model]`` in the order q heads, k kv-heads, v kv-heads.

    With a closed-form ln1 (``Structure.ln1_stats``), gw = (w * W) g is the only d_model-space product:
    mean(gw x^) and mean(gw) come from head space, (x^ . w W) . g and (mean_d w W) . g, so the
    Jacobian costs three passes over the reads instead of eight."""
    h = hook_names(layer)
    g = torch.cat([grads[h.qkv(which)] for which in "qkv"], dim=2).to(dtype)  # [batch, pos, reads, d_head]
    w = torch.cat([parts.weights(layer, which)[0] for which in "qkv"]).to(dtype)  # [reads, d_model, d_head]
    st = parts.ln1_stats(layer, x, dtype)
    if st is None:
        return parts.ln1_vjp(layer, x, torch.einsum("btre,rde->btrd", g, w))
    if st.w is not None:
        w = w * st.w[:, None]
    gw = torch.einsum("btre,rde->btrd", g, w)  # [batch, pos, reads, d_model]
    if st.scale is None or st.normed is None:
        return gw
    along = (torch.einsum("btd,rde->btre", st.normed, w) * g).sum(-1) / x.shape[-1]  # mean(gw x^) [batch, pos, reads]
    gw -= st.normed[:, :, None] * along[..., None]
    if st.centred:
        gw -= (torch.einsum("btre,re->btr", g, w.mean(1)))[..., None]  # mean(gw)
    return gw.div_(st.scale[:, :, None])


def receiver_grads(parts: Structure, values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                   dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Every receiver's gradient, in graph order, as blocks of receivers that read at one stage (a
    layer's attention reads, its MLP, the logits): ``[batch, pos, receivers of the block, d_model]`` each,
    one at a time (a large model's would not all fit at once)."""
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        attn = attention_reads(parts, layer, values[h.resid_pre], grads, dtype)
        yield attn
        if parts.attn_only:
            continue
        if parts.parallel:
            mlp = grads[h.resid_pre].to(dtype) - grads[h.resid_post].to(dtype) - attn.sum(2)
        else:
            mlp = grads[h.resid_mid].to(dtype) - grads[h.resid_post].to(dtype)
        yield mlp[:, :, None]
    yield grads[hook_names(parts.n_layers - 1).resid_post].to(dtype)[:, :, None]


class ReadSum:
    """The sum over IG steps of every receiver's gradient, as ``receiver_grads``' blocks.

    Where ln1 has a closed form (``Structure.ln1_stats``) a step's attention reads are added in head
    space, so a step costs its forward and backward pass and O(reads x d_head) per position, and the
    d_model-space reads are formed once: with W' = w * W, s_k and x^_k the norm's scale and output
    at step k, sum_k J_k^T W g_k = W' A - [mean_d(W' A)] - sum_k x^_k c_k, where A = sum_k g_k / s_k
    and c_k = x^_k . (W' g_k) / (d s_k) (the bracket for LayerNorm only). Other norms: each step's
    reads in d_model space (``attention_reads``).
    """

    def __init__(self, parts: Structure, dtype: torch.dtype):
        self.parts, self.dtype = parts, dtype
        self.head: dict[int, torch.Tensor] = {}  # layer -> A [batch, pos, reads, d_head]
        self.corr: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> [(x^_k, c_k)]
        self.stats: dict[int, NormStats] = {}
        self.dense: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "attn"/"mlp") -> d_model-space sums
        self.w: dict[int, torch.Tensor] = {}  # layer -> _weights(layer), cast once
        self.offset: dict[int, torch.Tensor] = {}  # layer -> the reads' constant part (_own), once

    def _weights(self, layer: int) -> torch.Tensor:
        """Every read's projection, q heads then k and v kv-heads: ``[reads, d_model, d_head]``."""
        if layer not in self.w:
            self.w[layer] = torch.cat([self.parts.weights(layer, w)[0] for w in "qkv"]).to(self.dtype)
        return self.w[layer]

    def _own(self, layer: int, values: dict[str, torch.Tensor], st: NormStats) -> torch.Tensor:
        """(x^ w) . W_r for every read r ``[batch, pos, reads, d_head]``: in float32 and float64 the
        read's own value less its constant part b_ln . W_r + b_r (``check_structure`` holds q/k/v =
        ln1(x) @ W + b), no d_model-space product per step; in half precision, where a large bias
        would take the difference's digits, projected from the normed input."""
        w = self._weights(layer)
        if self.parts.host.dtype not in (torch.float32, torch.float64):
            assert st.normed is not None
            return torch.einsum("btd,rde->btre", st.normed if st.w is None else st.normed * st.w, w)
        if layer not in self.offset:  # [reads, d_head]
            b = torch.cat([self.parts.weights(layer, which)[1] for which in "qkv"]).to(self.dtype)
            b_ln = self.parts.ln1_bias(layer)
            self.offset[layer] = b if b_ln is None else b + torch.einsum("d,rde->re", b_ln.to(self.dtype), w)
        h = hook_names(layer)
        return torch.cat([values[h.qkv(which)] for which in "qkv"], dim=2).to(self.dtype) - self.offset[layer]

    def _add(self, key, value: torch.Tensor) -> None:
        self.dense[key] = self.dense[key] + value if key in self.dense else value

    def add(self, values: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """One step's hook values and gradients."""
        p, dtype = self.parts, self.dtype
        for layer in range(p.n_layers):
            h = hook_names(layer)
            x = values[h.resid_pre]
            st = p.ln1_stats(layer, x, dtype)
            g = torch.cat([grads[h.qkv(w)] for w in "qkv"], dim=2).to(dtype)  # [batch, pos, reads, d_head]
            w = self._weights(layer)
            attn_sum: torch.Tensor | None = None  # the layer's attention reads summed: a parallel MLP needs it
            if st is None:
                attn = attention_reads(p, layer, x, grads, dtype)
                self._add((layer, "attn"), attn)
                if p.parallel:
                    attn_sum = attn.sum(2)
            else:
                self.stats[layer] = st
                scaled = g if st.scale is None else g / st.scale[:, :, None]
                self.head[layer] = self.head[layer] + scaled if layer in self.head else scaled
                if st.scale is not None and st.normed is not None:
                    c = (self._own(layer, values, st) * g).sum(-1) / (x.shape[-1] * st.scale)  # [batch, pos, reads]
                    self.corr.setdefault(layer, []).append((st.normed, c))
                if p.parallel:
                    attn_sum = p.ln1_vjp(layer, x, torch.einsum("btre,rde->btd", g, w)[:, :, None])[:, :, 0]
            if p.attn_only:
                continue
            if attn_sum is not None:  # parallel
                mlp = grads[h.resid_pre].to(dtype) - grads[h.resid_post].to(dtype) - attn_sum
            else:
                mlp = grads[h.resid_mid].to(dtype) - grads[h.resid_post].to(dtype)
            self._add((layer, "mlp"), mlp[:, :, None])
        self._add((p.n_layers, "logits"), grads[hook_names(p.n_layers - 1).resid_post].to(dtype)[:, :, None])

    def blocks(self) -> Iterator[torch.Tensor]:
        """The sums, in graph order, as ``receiver_grads`` yields one step's."""
        p = self.parts
        for layer in range(p.n_layers):
            if layer in self.head:
                st, w = self.stats[layer], self._weights(layer)
                ww = w if st.w is None else w * st.w[:, None]  # [reads, d_model, d_head]
                if st.centred:  # W'A - mean_d(W'A) = (W' - mean_d W') A
                    ww = ww - ww.mean(1, keepdim=True)
                reads = torch.einsum("btre,rde->btrd", self.head[layer], ww)
                if layer in self.corr:
                    normed, c = (torch.stack(t) for t in zip(*self.corr[layer]))  # [steps, batch, pos, ...]
                    reads.sub_(torch.einsum("kbtr,kbtd->btrd", c, normed))
                yield reads
            else:
                yield self.dense[layer, "attn"]
            if not p.attn_only:
                yield self.dense[layer, "mlp"]
        yield self.dense[p.n_layers, "logits"]


def grad_targets(parts: Structure) -> list[str]:
    """The hooks whose gradients ``receiver_grads`` takes."""
    out = []
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        out += [h.qkv("q"), h.qkv("k"), h.qkv("v"), h.resid_post]
        if parts.parallel:
            out.append(h.resid_pre)
        elif not parts.attn_only:
            out.append(h.resid_mid)
    return out


def edge_products(graph: Graph, writes: torch.Tensor, reads: Iterable[torch.Tensor]) -> torch.Tensor:
    """write(sender) . read(receiver) for every edge at every position: ``[batch, edge, pos]`` from
    ``writes`` ``[batch, pos, sender, d]`` and the blocks of ``receiver_grads``. Edges run receiver by
    receiver, each over the senders before it (a prefix), so a block's edges are one contiguous run."""
    out, r0 = [], 0
    for block in reads:  # [batch, pos, receivers, d]
        n = graph.senders_before(graph.receivers[r0].stage)
        prod = torch.einsum("btsd,btrd->brst", writes[:, :, :n], block)  # [batch, receivers, senders, pos]
        out.append(prod.flatten(1, 2))
        r0 += block.shape[2]
    return torch.cat(out, dim=1)

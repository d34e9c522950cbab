"""Writers and readers: the groups of senders and receivers an edge graph is built from.

A *writer* group is senders that write into the residual stream at one stage. It names the hook
values its writes come from (``hooks``), keeps what it needs of a run (``record``) and gives each
sender's change of write between two runs to first order (``delta``, ``[batch, pos, senders,
d_model]``: what the gradient methods dot with a receiver's gradient) and, exactly, the change of
its write when a set of its senders is patched (``change``: what a patched receiver reads). The
two are the same where the writes are additive; after a post-norm (Gemma 2/3, OLMo 2) the heads of
a layer write ``ln1_post(sum of their outputs)``, and a set of heads' change is that of the
normalised output with those heads alone patched.

A *reader* group is receivers that read the residual stream at one stage. It gives dL/d(the
residual as each receiver alone reads it) from one run's values and gradients (``reads``), their
sum over the points of an integrated-gradients path (``read_sum``), and, for exact patching, the
hooks that feed each receiver its own changed residual (``patches``).

The built-in groups are the embedding, each layer's heads and MLP (writers) and each layer's
queries, keys and values, its MLP's input and the logits (readers); dictionaries of features
(``edges.features``: SAEs and transcoders) are writers and readers through the same contracts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

import torch

from ..hosts.structure import NormStats, Structure, hook_names
from .graph import Receiver, Sender

Values = dict[str, torch.Tensor]
T = TypeVar("T")
Patch = Callable[[torch.Tensor], torch.Tensor]


class Writers(Protocol):
    """Senders writing at one stage (see the module's docstring)."""

    @property
    def senders(self) -> tuple[Sender, ...]:
        """Its senders, in graph order."""

    def hooks(self) -> set[str]:
        """Hooks whose values ``record`` reads."""

    def record(self, values: Values) -> Values:
        """What ``delta`` needs of a run whose hook values are ``values`` (the values themselves,
        or node values computed from them)."""

    def delta(self, new: Values, old: Values, dtype: torch.dtype, members: list[int] | None = None) -> torch.Tensor:
        """write(new) - write(old) of each sender (``members``: of those, by their number in the
        group), from two runs' ``record``s, to first order at ``old``: ``[batch, pos, senders, d_model]``."""

    def change(self, new: Values, old: Values, dtype: torch.dtype, members: list[int], weights: torch.Tensor
               ) -> torch.Tensor:
        """For each column r of ``weights`` (``[members, cols]`` or ``[members, cols, pos]``, 0 or 1:
        which of ``members`` are patched, at which positions), the exact change of the group's write
        when those senders take their ``new`` values and the others keep their ``old`` ones:
        ``[batch, pos, cols, d_model]``."""


class Readers(Protocol):
    """Receivers reading at one stage (see the module's docstring)."""

    @property
    def receivers(self) -> tuple[Receiver, ...]:
        """Its receivers, in graph order."""

    def value_hooks(self) -> set[str]:
        """Hooks whose values ``reads`` needs."""

    def grad_hooks(self) -> list[str]:
        """Hooks whose gradients ``reads`` needs."""

    def reads(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """dL/d(the residual as each receiver reads it) ``[batch, pos, receivers, d_model]``."""

    def read_sum(self, dtype: torch.dtype) -> "ReadSum":
        """An accumulator of ``reads`` over runs (the points of an IG path)."""

    def patches(self, run: "PatchedRun") -> dict[str, Patch]:
        """Hook -> patch that feeds each patched receiver its changed residual in ``run``."""


class ReadSum(Protocol):
    def add(self, values: Values, grads: Values) -> None:
        """One run's values and gradients."""

    def total(self) -> torch.Tensor:
        """The sum of ``reads`` over the runs added."""


@dataclass
class DenseSum:
    """``reads`` summed as they are, in d_model space."""

    group: Readers
    dtype: torch.dtype
    sum: torch.Tensor | None = None

    def add(self, values: Values, grads: Values) -> None:
        r = self.group.reads(values, grads, self.dtype)
        self.sum = r if self.sum is None else self.sum + r

    def total(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum


class PatchedRun:
    """One exact-patching forward pass as the reader groups' patches see it: ``deltas(group,
    members)`` gives, for the group's receivers ``members`` (numbered in the group), (delta
    ``[copies, pos, members, d_model]``, patched ``[copies, members]`` bool) or None where no copy
    patches any; ``live`` the hook values recorded so far in this run; ``recompute(fn)`` runs a
    piece of the model without firing the patches (a Bridge's modules fire hooks of their own)."""

    def __init__(self, deltas: Callable[[Readers, list[int]], tuple[torch.Tensor, torch.Tensor] | None],
                 live: Values):
        self._deltas, self.live = deltas, live
        self.busy = False

    def deltas(self, group: Readers, members: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        # a writer's change may run a piece of the model (a post-norm)
        return self.recompute(lambda: self._deltas(group, members))

    def recompute(self, fn: Callable[[], T]) -> T:
        busy, self.busy = self.busy, True
        try:
            return fn()
        finally:
            self.busy = busy


# --- writers -------------------------------------------------------------------------------------
def summed(per_sender: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``per_sender`` ``[batch, pos, senders, d]`` summed under ``weights`` ``[senders, cols]`` or
    ``[senders, cols, pos]``: ``[batch, pos, cols, d]`` (an additive group's ``change``)."""
    spec = "ctsd,srt->ctrd" if weights.ndim == 3 else "ctsd,sr->ctrd"
    return torch.einsum(spec, per_sender, weights.to(per_sender))


@dataclass(frozen=True)
class HookWrites:
    """Senders whose write is a hook's value itself: the embedding (``blocks.0.hook_resid_pre``) or
    an MLP's output (``hook_mlp_out``); one sender."""

    senders: tuple[Sender, ...]
    hook: str

    def hooks(self) -> set[str]:
        return {self.hook}

    def record(self, values: Values) -> Values:
        return {self.hook: values[self.hook]}

    def delta(self, new: Values, old: Values, dtype: torch.dtype, members: list[int] | None = None) -> torch.Tensor:
        return (new[self.hook].to(dtype) - old[self.hook].to(dtype))[:, :, None]

    def change(self, new: Values, old: Values, dtype: torch.dtype, members: list[int], weights: torch.Tensor
               ) -> torch.Tensor:
        return summed(self.delta(new, old, dtype), weights)


@dataclass(frozen=True)
class HeadWrites:
    """A layer's heads: head h writes ``z_h @ W_O[h]``; kept compact (z) until a delta is asked.

    Behind a post-norm (``Structure.post_normed``) the layer writes ``ln1_post(a)``, a = sum_h z_h
    W_O[h] + b_O: head h's write is then the change of that normalised output with head h alone
    patched, exact for patching (``change``) and J(a) z_h W_O[h] for the gradient methods
    (``delta``), so a head's edges still sum to its node AtP at ``hook_z``."""

    senders: tuple[Sender, ...]
    parts: Structure
    layer: int

    @property
    def hook(self) -> str:
        return hook_names(self.layer).z

    def hooks(self) -> set[str]:
        return {self.hook}

    def record(self, values: Values) -> Values:
        return {self.hook: values[self.hook]}

    def z_change(self, new: Values, old: Values, dtype: torch.dtype) -> torch.Tensor:
        """z(new) - z(old) ``[batch, pos, head, d_head]``."""
        return new[self.hook].to(dtype) - old[self.hook].to(dtype)

    @property
    def additive(self) -> bool:
        """Whether each head's write is ``z_h @ W_O[h]`` itself (no post-norm)."""
        return not self.parts.post_normed(self.layer)

    def output(self, values: Values, dtype: torch.dtype) -> torch.Tensor:
        """The attention output before any post-norm ``[batch, pos, d_model]`` (``Structure.attn_output``)."""
        return self.parts.attn_output(self.layer, values[self.hook].to(dtype))

    def _raw(self, new: Values, old: Values, dtype: torch.dtype, members: list[int] | None) -> torch.Tensor:
        """z_h(new) - z_h(old) through W_O[h] ``[batch, pos, senders, d_model]``."""
        dz, w_o = self.z_change(new, old, dtype), self.parts.W_O(self.layer).to(dtype)
        if members is not None:
            dz, w_o = dz[:, :, members], w_o[members]
        return torch.einsum("bthe,hed->bthd", dz, w_o)

    def delta(self, new: Values, old: Values, dtype: torch.dtype, members: list[int] | None = None) -> torch.Tensor:
        raw = self._raw(new, old, dtype, members)
        return raw if self.additive else self.parts.attn_write_jvp(self.layer, self.output(old, dtype), raw)

    def change(self, new: Values, old: Values, dtype: torch.dtype, members: list[int], weights: torch.Tensor
               ) -> torch.Tensor:
        raw = summed(self._raw(new, old, dtype, members), weights)  # [batch, pos, cols, d_model]
        if self.additive:
            return raw
        a = self.output(old, dtype)[:, :, None]
        host = self.parts.host.dtype
        return (self.parts.attn_write(self.layer, (a + raw).to(host)).to(dtype)
                - self.parts.attn_write(self.layer, a.to(host)).to(dtype))


# --- readers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionReads:
    """A layer's queries (one per head), keys and values (one per kv-head), in that order: each
    reads the residual through ln1 and its own projection."""

    receivers: tuple[Receiver, ...]
    parts: Structure
    layer: int

    def value_hooks(self) -> set[str]:
        h = hook_names(self.layer)
        return {h.resid_pre, h.qkv("q"), h.qkv("k"), h.qkv("v")}

    def grad_hooks(self) -> list[str]:
        h = hook_names(self.layer)
        return [h.qkv("q"), h.qkv("k"), h.qkv("v")]

    def weights(self, dtype: torch.dtype) -> torch.Tensor:
        """Every read's projection, q heads then k and v kv-heads: ``[reads, d_model, d_head]``."""
        return torch.cat([self.parts.weights(self.layer, w)[0] for w in "qkv"]).to(dtype)

    def head_grads(self, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """dL/d(q, k, v) of every read ``[batch, pos, reads, d_head]``."""
        h = hook_names(self.layer)
        return torch.cat([grads[h.qkv(which)] for which in "qkv"], dim=2).to(dtype)

    def reads(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """With a closed-form ln1 (``Structure.ln1_stats``), gw = (w * W) g is the only d_model-space
        product: mean(gw x^) and mean(gw) come from head space, (x^ . w W) . g and (mean_d w W) . g,
        so the Jacobian costs three passes over the reads instead of eight."""
        x = values[hook_names(self.layer).resid_pre]
        g = self.head_grads(grads, dtype)  # [batch, pos, reads, d_head]
        w = self.weights(dtype)  # [reads, d_model, d_head]
        st = self.parts.ln1_stats(self.layer, x, dtype)
        if st is None:
            return self.parts.ln1_vjp(self.layer, x, torch.einsum("btre,rde->btrd", g, w))
        if st.w is not None:
            w = w * st.w[:, None]
        gw = torch.einsum("btre,rde->btrd", g, w)  # [batch, pos, reads, d_model]
        if st.scale is None or st.normed is None:
            return gw
        # mean(gw x^) [batch, pos, reads]
        along = (torch.einsum("btd,rde->btre", st.normed, w) * g).sum(-1) / x.shape[-1]
        gw -= st.normed[:, :, None] * along[..., None]
        if st.centred:
            gw -= (torch.einsum("btre,re->btr", g, w.mean(1)))[..., None]  # mean(gw)
        return gw.div_(st.scale[:, :, None])

    def summed(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """The layer's reads summed over its receivers ``[batch, pos, d_model]`` (what a parallel
        block's MLP read leaves out), one d_model-space product."""
        x = values[hook_names(self.layer).resid_pre]
        g = torch.einsum("btre,rde->btd", self.head_grads(grads, dtype), self.weights(dtype))
        return self.parts.ln1_vjp(self.layer, x, g[:, :, None])[:, :, 0]

    def read_sum(self, dtype: torch.dtype) -> ReadSum:
        return AttentionSum(self, dtype)

    def patches(self, run: PatchedRun) -> dict[str, Patch]:
        h, parts, layer = hook_names(self.layer), self.parts, self.layer
        start = {"q": 0, "k": parts.n_heads, "v": parts.n_heads + parts.n_kv}
        count = {"q": parts.n_heads, "k": parts.n_kv, "v": parts.n_kv}

        def patch(which: str) -> Patch:
            def fn(x: torch.Tensor) -> torch.Tensor:
                mine = list(range(start[which], start[which] + count[which]))
                got = run.deltas(self, mine)
                if got is None:
                    return x
                delta, patched = got
                rows = patched.any(1).nonzero().flatten()
                xr = run.live[h.resid_pre][rows]
                # [rows, pos, heads, d_model]
                normed = run.recompute(lambda: parts.ln1(layer, xr[:, :, None] + delta[rows].to(xr.dtype)))
                new = parts.project(layer, which, normed).to(x.dtype)
                out = x.clone()
                out[rows] = torch.where(patched[rows][:, None, :, None], new, x[rows])
                return out
            return fn

        return {h.qkv(which): patch(which) for which in "qkv"}


class AttentionSum:
    """The sum over IG steps of a layer's attention reads. Where ln1 has a closed form
    (``Structure.ln1_stats``) a step's reads are added in head space, so a step costs its forward
    and backward pass and O(reads x d_head) per position, and the d_model-space reads are formed
    once: with W' = w * W, s_k and x^_k the norm's scale and output at step k, sum_k J_k^T W g_k =
    W' A - [mean_d(W' A)] - sum_k x^_k c_k, where A = sum_k g_k / s_k and c_k = x^_k . (W' g_k) /
    (d s_k) (the bracket for LayerNorm only). Other norms: each step's reads in d_model space."""

    def __init__(self, group: AttentionReads, dtype: torch.dtype):
        self.group, self.dtype = group, dtype
        self.head: torch.Tensor | None = None  # A [batch, pos, reads, d_head]
        self.corr: list[tuple[torch.Tensor, torch.Tensor]] = []  # [(x^_k, c_k)]
        self.stats: NormStats | None = None
        self.dense = DenseSum(group, dtype)
        self.w = group.weights(dtype)
        self.offset: torch.Tensor | None = None  # the reads' constant part (_own), once

    def _own(self, values: Values, st: NormStats) -> torch.Tensor:
        """(x^ w) . W_r for every read r ``[batch, pos, reads, d_head]``: in float32 and float64 the
        read's own value less its constant part b_ln . W_r + b_r (``check_structure`` holds q/k/v =
        ln1(x) @ W + b), no d_model-space product per step; in half precision, where a large bias
        would take the difference's digits, projected from the normed input."""
        parts, layer = self.group.parts, self.group.layer
        if parts.host.dtype not in (torch.float32, torch.float64):
            assert st.normed is not None
            return torch.einsum("btd,rde->btre", st.normed if st.w is None else st.normed * st.w, self.w)
        if self.offset is None:  # [reads, d_head]
            b = torch.cat([parts.weights(layer, which)[1] for which in "qkv"]).to(self.dtype)
            b_ln = parts.ln1_bias(layer)
            self.offset = b if b_ln is None else b + torch.einsum("d,rde->re", b_ln.to(self.dtype), self.w)
        h = hook_names(layer)
        return torch.cat([values[h.qkv(which)] for which in "qkv"], dim=2).to(self.dtype) - self.offset

    def add(self, values: Values, grads: Values) -> None:
        x = values[hook_names(self.group.layer).resid_pre]
        st = self.group.parts.ln1_stats(self.group.layer, x, self.dtype)
        if st is None:
            self.dense.add(values, grads)
            return
        self.stats = st
        g = self.group.head_grads(grads, self.dtype)  # [batch, pos, reads, d_head]
        scaled = g if st.scale is None else g / st.scale[:, :, None]
        self.head = scaled if self.head is None else self.head + scaled
        if st.scale is not None and st.normed is not None:
            c = (self._own(values, st) * g).sum(-1) / (x.shape[-1] * st.scale)  # [batch, pos, reads]
            self.corr.append((st.normed, c))

    def total(self) -> torch.Tensor:
        if self.head is None:
            return self.dense.total()
        st = self.stats
        assert st is not None
        ww = self.w if st.w is None else self.w * st.w[:, None]  # [reads, d_model, d_head]
        if st.centred:  # W'A - mean_d(W'A) = (W' - mean_d W') A
            ww = ww - ww.mean(1, keepdim=True)
        reads = torch.einsum("btre,rde->btrd", self.head, ww)
        if self.corr:
            normed, c = (torch.stack(t) for t in zip(*self.corr))  # [steps, batch, pos, ...]
            reads.sub_(torch.einsum("kbtr,kbtd->btrd", c, normed))
        return reads


@dataclass(frozen=True)
class MLPReads:
    """A layer's MLP input: dL/d(resid_mid) - dL/d(resid_post) in a sequential block (resid_post =
    resid_mid + mlp_out); dL/d(resid_pre) - dL/d(resid_post) less the layer's attention reads in a
    parallel block (resid_post = resid_pre + attn_out + mlp_out). Exact patching recomputes the MLP
    from the changed residual at ``hook_mlp_out``."""

    receivers: tuple[Receiver, ...]
    parts: Structure
    layer: int
    attention: AttentionReads | None = None  # a parallel block's attention reads

    @property
    def site(self) -> str:
        """The hook holding the residual the MLP reads."""
        h = hook_names(self.layer)
        return h.resid_pre if self.parts.parallel else h.resid_mid

    def value_hooks(self) -> set[str]:
        return {self.site} | (self.attention.value_hooks() if self.attention else set())

    def grad_hooks(self) -> list[str]:
        return [hook_names(self.layer).resid_post, self.site] + (self.attention.grad_hooks() if self.attention else [])

    def input_grad(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """dL/d(the MLP's input residual) ``[batch, pos, d_model]``."""
        g = grads[self.site].to(dtype) - grads[hook_names(self.layer).resid_post].to(dtype)
        return g - self.attention.summed(values, grads, dtype) if self.attention else g

    def reads(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        return self.input_grad(values, grads, dtype)[:, :, None]

    def read_sum(self, dtype: torch.dtype) -> ReadSum:
        return DenseSum(self, dtype)

    def patches(self, run: PatchedRun) -> dict[str, Patch]:
        parts, layer, site = self.parts, self.layer, self.site
        mine = list(range(len(self.receivers)))

        def fn(x: torch.Tensor) -> torch.Tensor:
            got = run.deltas(self, mine)
            if got is None:
                return x
            delta, patched = got
            rows = patched[:, 0].nonzero().flatten()
            x = x.clone()
            x[rows] = run.recompute(lambda: parts.mlp_of(layer, run.live[site][rows] + delta[rows, :, 0].to(x.dtype)))
            return x

        return {hook_names(layer).mlp_out: fn}


@dataclass(frozen=True)
class LogitReads:
    """The logits: they read the last ``resid_post`` (through ``ln_final``); patched by adding the change there."""

    receivers: tuple[Receiver, ...]
    n_layers: int

    @property
    def hook(self) -> str:
        return hook_names(self.n_layers - 1).resid_post

    def value_hooks(self) -> set[str]:
        return set()

    def grad_hooks(self) -> list[str]:
        return [self.hook]

    def reads(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        return grads[self.hook].to(dtype)[:, :, None]

    def read_sum(self, dtype: torch.dtype) -> ReadSum:
        return DenseSum(self, dtype)

    def patches(self, run: PatchedRun) -> dict[str, Patch]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            got = run.deltas(self, [0])
            return x if got is None else x + got[0][:, :, 0].to(x.dtype)
        return {self.hook: fn}


@dataclass
class Writes:
    """The ``record``s of every writer group of one run (or of several copies): ``[copies, pos, ...]`` each."""

    values: Values = field(default_factory=dict)

    def rows(self, rows: torch.Tensor) -> "Writes":
        return Writes({k: v[rows] for k, v in self.values.items()})

    def map(self, fn: Callable[..., torch.Tensor], *others: "Writes") -> "Writes":
        """``fn`` applied tensor by tensor to ``self`` and ``others`` (each one's tensors in that order)."""
        return Writes({k: fn(v, *(o.values[k] for o in others)) for k, v in self.values.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.values.values())).device

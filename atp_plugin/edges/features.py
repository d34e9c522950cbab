"""Features as edge nodes: an SAE or a transcoder splits the component it sits on into its kept
features, an error node and the rest of its features, each a sender and (at an MLP or on the
residual stream) a receiver.

With ``f = encode(u)`` the dictionary's features at a position (``u``: what it encodes; the site
value ``a`` for an SAE, the MLP's input for a transcoder), ``K`` the kept features and ``W_dec``
its decoder, the site ``a = decode(f) + e`` splits exactly into

* feature ``i`` in ``K``: writes ``f_i W_dec[i]``;
* the rest: writes ``sum_{i not in K} f_i W_dec[i]`` (the features the graph does not keep, as
  one node, so the graph stays complete: patching every edge still gives the corrupt run);
* the error node: writes ``e = a - decode(f)``;
* and the decoder's bias, the same in every run.

An SAE on the residual stream (``hook_resid_pre`` of a later layer, ``hook_resid_post``) is a
bottleneck of the graph: its nodes read the residual at its hook (``x -> f_i(x)``; the error
``x -> x - decode(f(x))``) and their writes are the residual after it, so what was written before
it reaches what reads after it only through them (``Graph.cuts``).

At an MLP (an SAE on ``hook_mlp_out``, a transcoder into it) each node also reads the residual
the MLP reads: feature ``i`` as ``x -> f_i(u(x))``, the rest as the other features, the error as
``x -> a(x) - decode(f(u(x)))``; their reads sum to the MLP's. An SAE on ``hook_attn_out`` writes
in place of the layer's heads; what the attention reads stays the heads' queries, keys and values.
Exact patching of an edge into node ``v`` recomputes ``v`` alone from the changed residual (the
other nodes of the dictionary keep their values, the error included); first-order scores use
``dL/df_i = W_dec[i] . dL/da`` and ``dL/de = dL/da``.

Decoders must be linear in the features (``decode(f) = f W_dec + b``, checked on the first run):
SAE-Lens's standard, top-k and JumpReLU SAEs and transcoders without input normalisation,
``saes.SimpleSAE``, ``saes.TopKSAE``, sparsify's coders.
"""

from __future__ import annotations

import numbers
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..engine.runs import run
from ..errors import UnsupportedModelError
from ..hosts import rounding
from ..hosts.structure import Structure, hook_names
from .graph import Receiver, Sender
from .groups import AttentionReads, DenseSum, MLPReads, Patch, PatchedRun, ReadSum, Values, summed

#: what ``keep=`` takes: the top k features of each dictionary by node AtP, every feature whose node
#: score reaches a threshold, or the features of each dictionary by name
Keep = int | float | Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Placement:
    """Where a dictionary sits: its adapter, ``"mlp"`` or ``"attn"`` of ``layer`` or ``"resid"``
    (the residual stream at ``hook``), the hook it encodes (``hook_in``) and the site it writes
    (``hook``)."""

    adapter: Any
    place: str
    layer: int
    hook_in: str
    hook: str

    @property
    def prefix(self) -> str:
        """The name its nodes share: ``mlp3``, ``attn3``, ``resid_pre3`` or ``resid_post3``."""
        return self.hook.split(".")[-1].removeprefix("hook_") + str(self.layer) if self.place == "resid" \
            else f"{self.place}{self.layer}"

    @property
    def stage(self) -> float:
        """Where it writes in the graph's stage order (``edges.graph``): a residual-stream dictionary
        between the MLP (or heads) before it and the heads after it."""
        if self.place == "resid":
            return 2 * self.layer + (0.5 if self.hook.endswith("resid_pre") else 2.5)
        return 2 * self.layer + (1 if self.place == "attn" else 2)


def placement(parts: Structure, adapter: Any) -> Placement:
    """Where ``adapter`` (an ``SAEFeatures`` or ``TranscoderFeatures``) sits in the edge graph, or a
    clear error naming what is not served."""
    from ..adapters.sae import SAEFeatures
    from ..adapters.transcoder import TranscoderFeatures
    if not isinstance(adapter, SAEFeatures):
        raise TypeError(f"features= takes SAEFeatures or TranscoderFeatures adapters (atp_plugin.adapters), got "
                        f"{type(adapter).__name__}; wrap an SAE-shaped object: SAEFeatures(sae, hook=...)")
    if adapter.head is not None:
        raise ValueError(f"{adapter.name}: an SAE on one head (hook_head_index) cannot be an edge node; edges take "
                         "SAEs on hook_mlp_out or hook_attn_out and transcoders into hook_mlp_out")
    n = parts.n_layers
    sites = {hook_names(layer).mlp_out: ("mlp", layer) for layer in range(n)}
    if not isinstance(adapter, TranscoderFeatures):
        sites |= {f"blocks.{layer}.hook_attn_out": ("attn", layer) for layer in range(n)}
        sites |= {hook_names(layer).resid_pre: ("resid", layer) for layer in range(1, n)}
        sites |= {hook_names(layer).resid_post: ("resid", layer) for layer in range(n)}
    where = sites.get(adapter.hook)
    if where is None or (where[0] == "mlp" and parts.attn_only):
        what = "a transcoder writing" if isinstance(adapter, TranscoderFeatures) else "an SAE"
        raise UnsupportedModelError(
            f"{adapter.name}: {what} at {adapter.hook!r} cannot be an edge node; feature edges take SAEs on "
            "blocks.L.hook_mlp_out, blocks.L.hook_attn_out and the residual stream (hook_resid_pre of a layer "
            "after the first, hook_resid_post), and transcoders into blocks.L.hook_mlp_out; attribute() ranks "
            "any SAE's features as nodes")
    place, layer = where
    hook_in = adapter.hook
    if isinstance(adapter, TranscoderFeatures):
        hook_in = adapter.hook_in
        reads = _mlp_reads(parts, layer)
        if hook_in not in reads:
            raise UnsupportedModelError(f"{adapter.name}: a transcoder into layer {layer}'s MLP output must read "
                                        f"that MLP's input ({', '.join(sorted(reads))}) to be an edge node, not "
                                        f"{hook_in!r}")
    return Placement(adapter, place, layer, hook_in, adapter.hook)


def _mlp_reads(parts: Structure, layer: int) -> set[str]:
    """The hooks a layer's MLP input is read at (``Structure.mlp_hooks``), besides its output."""
    return set(parts.mlp_hooks(layer)) - {hook_names(layer).mlp_out}


def check_keep(keep: Keep, names: Sequence[str]) -> None:
    """A clear error for a ``keep=`` that is neither a count, a threshold nor a mapping of the
    dictionaries ``names`` to feature numbers."""
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(names))
        if unknown:
            raise ValueError(f"keep= names dictionaries {unknown} that features= does not hold; known: {list(names)}")
    elif isinstance(keep, bool) or not isinstance(keep, numbers.Real) or keep != keep or keep < 0:
        raise ValueError(f"keep= must be a number of features per dictionary (int >= 0), a node-score threshold "
                         f"(float >= 0) or a dict dictionary name -> feature numbers, got {keep!r}")


def kept_features(keep: Keep, scores: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, list[int]]:
    """The features each dictionary keeps: ``keep`` an int (the top k of each by ``scores``, a
    dictionary name -> ``[d_sae]`` node score), a float (every feature scoring at least it) or a
    mapping name -> feature numbers (``scores`` unused)."""
    check_keep(keep, names)
    if isinstance(keep, Mapping):
        return {name: sorted({int(i) for i in keep.get(name, ())}) for name in names}
    out = {}
    for name in names:
        s = scores[name]
        if isinstance(keep, numbers.Integral):
            top = torch.argsort(s, descending=True, stable=True)[: int(keep)]
            out[name] = sorted(int(i) for i in top if float(s[i]) > 0)
        else:
            out[name] = (s >= keep).nonzero().flatten().tolist()
    return out


def kept_of(graph: Any) -> dict[str, list[int]]:
    """Dictionary name -> the features ``graph`` keeps of it (what ``keep=`` takes to rebuild it)."""
    return {w.where.adapter.name: w.kept.tolist() for w in graph.writers if isinstance(w, Dictionary)}


#: SAE -> whether its encoder is linear where active (``Dictionary._gated``), found on its first batch
_GATED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


class Dictionary:
    """One dictionary's nodes as a writer group and, at an MLP or on the residual stream, a reader
    group: its kept features (in ``kept`` order), then its error node, then the rest (see the
    module's docstring)."""

    def __init__(self, parts: Structure, where: Placement, kept: Sequence[int], stage_read: float,
                 first_sender: int, attention: AttentionReads | None = None):
        """``stage_read``: where its nodes read (an MLP's nodes read where the MLP does, before it
        writes in a parallel block); ``first_sender``: the number of its first node among the graph's
        senders; ``attention``: the layer's attention reads in a parallel block (what the MLP's read
        leaves out)."""
        self.parts, self.where = parts, where
        d_sae = int(where.adapter.sae.W_dec.shape[0])
        bad = [i for i in kept if not 0 <= i < d_sae]
        if bad:
            raise ValueError(f"{where.adapter.name}: feature(s) {bad[:5]} do not exist (d_sae={d_sae})")
        self.kept = torch.tensor(list(kept), dtype=torch.long)
        names = [f"{where.prefix}.f{i}" for i in kept] + [f"{where.prefix}.error", f"{where.prefix}.rest"]
        kinds = ["feature"] * len(kept) + ["error", "rest"]
        index = list(kept) + [-1, -1]
        self.senders = tuple(Sender(n, k, where.layer, -1, where.stage, i) for n, k, i in zip(names, kinds, index))
        self.receivers: tuple[Receiver, ...] = ()
        self.mlp: MLPReads | None = None
        if where.place != "attn":
            self.receivers = tuple(Receiver(n, k, where.layer, -1, stage_read, (first_sender + j,), index=i)
                                   for j, (n, k, i) in enumerate(zip(names, kinds, index)))
        if where.place == "mlp":
            self.mlp = MLPReads((), parts, where.layer, attention)
        self.keys = tuple(f"{where.hook}#{part}" for part in ("features", "error", "rest"))
        # whether the encoder is linear where active (df_i/du = W_enc[:, i] where f_i != 0): None until a
        # batch has compared that shortcut with the full backward; False where the SAE has no W_enc
        w_enc = getattr(where.adapter.sae, "W_enc", None)
        fits = isinstance(w_enc, torch.Tensor) and w_enc.ndim == 2 and int(w_enc.shape[1]) == d_sae
        self._gated: bool | None = _GATED.get(where.adapter.sae) if fits else False

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    # --- the SAE's code ------------------------------------------------------------------------
    def _w_dec(self, dtype: torch.dtype) -> torch.Tensor:
        return self.where.adapter.sae.W_dec.to(dtype)  # [d_sae, d_model]

    def nodes(self, u: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept features ``[batch, pos, kept]``, error ``[batch, pos, d_model]`` and the rest's write
        ``[batch, pos, d_model]`` of encoded input ``u`` and site value ``a``."""
        adapter = self.where.adapter
        with adapter._disabled():
            f = adapter.sae.encode(u)  # [batch, pos, d_sae]
            err = a - adapter.sae.decode(f).to(a.dtype)
        kept = self.kept.to(f.device)
        rest = f.index_fill(-1, kept, 0) @ self._w_dec(f.dtype)
        return f[..., kept], err, rest.to(a.dtype)

    def bias(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """decode(0): what the decoder writes with every feature off ``[d_model]``."""
        adapter = self.where.adapter
        with adapter._disabled():
            return adapter.sae.decode(torch.zeros(adapter.sae.W_dec.shape[0], dtype=adapter.sae.W_dec.dtype,
                                                  device=device)).to(dtype)

    def check(self, values: Values, mask: torch.Tensor) -> None:
        """On one run: the decoder is linear in the features, and (at an MLP) the hooks it reads are
        what the host's structure recomputes from the residual."""
        adapter, where = self.where.adapter, self.where
        u = values[where.hook_in]
        tol = rounding(self.parts.host.dtype)
        with torch.no_grad(), adapter._disabled():
            f = adapter.sae.encode(u)
            got = adapter.sae.decode(f)
            want = f @ adapter.sae.W_dec + self.bias(got.dtype, got.device)
        real = mask[:, :, None].to(got.dtype)
        scale = max(float((want * real).abs().max()), 1e-30)
        if not float(((got - want) * real).abs().max()) / scale <= 100 * tol:
            raise UnsupportedModelError(f"{adapter.name}: its decoder is not linear in the features (decode(f) = "
                                        "f W_dec + b); feature edges need that (no input normalisation or decoder "
                                        "rescaling at run time); attribute() ranks its features as nodes")
        if self.mlp is None:
            return
        with torch.no_grad():
            sites = self.parts.mlp_sites(where.layer, values[self.site])
        for hook in (where.hook_in, where.hook):
            want, got = values[hook].double(), sites[hook].double()
            err = float(((got - want) * mask[:, :, None]).abs().max()) / max(float(want.abs().max()), 1e-30)
            if not err <= tol:
                raise UnsupportedModelError(f"{adapter.name}: this model's {hook!r} is not what the edge engine "
                                            f"recomputes from the residual the MLP reads (relative mismatch "
                                            f"{err:.2g})")

    # --- writers ------------------------------------------------------------------------------------
    def hooks(self) -> set[str]:
        return {self.where.hook_in, self.where.hook}

    def record(self, values: Values) -> Values:
        if self.keys[0] in values:
            return {k: values[k] for k in self.keys}
        with torch.no_grad():
            return dict(zip(self.keys, self.nodes(values[self.where.hook_in], values[self.where.hook])))

    def delta(self, new: Values, old: Values, dtype: torch.dtype, members: list[int] | None = None) -> torch.Tensor:
        """Feature i: (f_i(new) - f_i(old)) W_dec[i]; the error and the rest: their writes' change."""
        k = self.n_kept
        members = list(range(k + 2)) if members is None else members
        f, err, rest = ((new[key].to(dtype) - old[key].to(dtype)) for key in self.keys)
        feats = [m for m in members if m < k]
        w = self._w_dec(dtype)
        w = w[self.kept[feats].to(w.device)]  # [features, d_model]
        parts = {m: f[:, :, m, None] * w[j] for j, m in enumerate(feats)}
        parts.update({m: err if m == k else rest for m in members if m >= k})
        return torch.stack([parts[m] for m in members], dim=2)

    def change(self, new: Values, old: Values, dtype: torch.dtype, members: list[int], weights: torch.Tensor
               ) -> torch.Tensor:
        """Its nodes' writes add up (the decoder is linear in the features)."""
        return summed(self.delta(new, old, dtype, members), weights)

    # --- readers (at an MLP or on the residual stream) ---------------------------------------------------
    @property
    def site(self) -> str:
        """The hook holding the residual its nodes read: the MLP's, or its own."""
        return self.mlp.site if self.mlp is not None else self.where.hook

    def sites(self, x: torch.Tensor, output: bool = True) -> dict[str, torch.Tensor]:
        """The values of the hooks it encodes and writes for the residual ``x`` it reads (without
        ``output``, not the MLP's output where the dictionary does not encode it)."""
        if self.mlp is None:
            return {self.where.hook: x}
        return self.parts.mlp_sites(self.where.layer, x, output)

    def input_grad(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """dL/d(the residual it reads) through the component it splits ``[batch, pos, d_model]``:
        the MLP's read, or on the residual stream the gradient after it."""
        if self.mlp is not None:
            return self.mlp.input_grad(values, grads, dtype)
        return grads[self.where.hook].to(dtype)

    def value_hooks(self) -> set[str]:
        return (self.mlp.value_hooks() if self.mlp is not None else set()) | {self.site, self.where.hook_in}

    def grad_hooks(self) -> list[str]:
        return (self.mlp.grad_hooks() if self.mlp is not None else []) + [self.where.hook]

    def reads(self, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """Feature i: dL/df_i times the gradient of f_i(u(x)); the rest: the other features'; the
        error: the MLP's read less every feature's. One forward of the MLP and encoder, one backward
        through the encoder for all features, and one backward from the encoded input ``u`` per kept
        feature plus one, batched. Where the encoder is linear where active (``_gated``: ReLU,
        top-k, JumpReLU on u W_enc + b), feature i's gradient in u is W_enc[:, i] where f_i is on;
        otherwise one backward through the encoder per kept feature."""
        adapter, k = self.where.adapter, self.n_kept
        x = values[self.site]
        g_f = grads[self.where.hook] @ adapter.sae.W_dec.T.to(grads[self.where.hook].dtype)  # dL/df [batch, pos, d_sae]
        kept = self.kept.to(g_f.device)
        with torch.enable_grad(), adapter._disabled():
            xs = x.detach().requires_grad_(True)
            u = self.sites(xs, output=self.where.hook_in == self.where.hook)[self.where.hook_in]  # [batch, pos, d_in]
            f = adapter.sae.encode(u)
            if self._gated is not False:
                (whole,) = torch.autograd.grad(f, u, g_f.to(f.dtype), retain_graph=True)  # [batch, pos, d_in]
                on = (g_f[..., kept] * (f[..., kept] != 0)).permute(2, 0, 1)[..., None]  # [kept, batch, pos, 1]
                w_enc = adapter.sae.W_enc[:, kept].T.to(on.dtype)  # [kept, d_in]
                cot = torch.cat([on * w_enc[:, None, None], whole[None]])  # [kept + 1, batch, pos, d_in]
                (fast,) = torch.autograd.grad(u, xs, cot.to(u.dtype), is_grads_batched=True, retain_graph=True)
                if self._gated:
                    return self._assemble(fast.to(dtype), values, grads, dtype)
            cot = torch.zeros((k + 1,) + g_f.shape, dtype=g_f.dtype, device=g_f.device)  # [kept + 1, batch, pos, d_sae]
            cot[torch.arange(k, device=g_f.device), ..., kept] = g_f[..., kept].permute(2, 0, 1)
            cot[k] = g_f
            # one copy of the residual per cotangent, one backward (not vmap: an encoder may hold ops it refuses)
            copies = x.detach()[None].expand((k + 1,) + x.shape).clone().requires_grad_(True)  # [kept + 1, b, pos, d]
            sites = self.sites(copies.flatten(0, 1), output=self.where.hook_in == self.where.hook)
            f_copies = adapter.sae.encode(sites[self.where.hook_in])  # [(kept + 1) batch, pos, d_sae]
            (dx,) = torch.autograd.grad(f_copies, copies, cot.flatten(0, 1).to(f_copies.dtype))
        if self._gated is None:  # the first batch decides: the shortcut where it gives the full backward's reads
            tol = 100 * rounding(self.parts.host.dtype) * max(float(dx.abs().max()), 1e-30)
            self._gated = _GATED[self.where.adapter.sae] = float((fast - dx).abs().max()) <= tol
        return self._assemble(dx.to(dtype), values, grads, dtype)

    def _assemble(self, dx: torch.Tensor, values: Values, grads: Values, dtype: torch.dtype) -> torch.Tensor:
        """The reads ``[batch, pos, kept + 2, d]`` from the kept features' and all features' gradients
        ``dx`` ``[kept + 1, batch, pos, d]``."""
        k = self.n_kept
        error = self.input_grad(values, grads, dtype) - dx[k]
        rest = dx[k] - dx[:k].sum(0)
        return torch.cat([dx[:k].permute(1, 2, 0, 3), error[:, :, None], rest[:, :, None]], dim=2)

    def read_sum(self, dtype: torch.dtype) -> ReadSum:
        return DenseSum(self, dtype)

    def patches(self, run: PatchedRun) -> dict[str, Patch]:
        where, k = self.where, self.n_kept
        members = list(range(k + 2))

        def fn(a: torch.Tensor) -> torch.Tensor:
            got = run.deltas(self, members)
            if got is None:
                return a
            delta, patched = got
            x = run.live[self.site] if self.mlp is not None else a  # on the residual stream: what it reads
            feats, err, rest = self.nodes(a if where.hook_in == where.hook else run.live[where.hook_in], a)
            for m in patched.any(0).nonzero().flatten().tolist():
                rows = patched[:, m].nonzero().flatten()
                changed = x[rows] + delta[rows, :, m].to(x.dtype)
                sites = run.recompute(lambda: self.sites(changed))  # noqa: B023 - run at once
                f_new, err_new, rest_new = self.nodes(sites[where.hook_in], sites[where.hook])
                if m < k:
                    feats[rows, :, m] = f_new[..., m]
                elif m == k:
                    err[rows] = err_new
                else:
                    rest[rows] = rest_new
            run.live.update(zip(self.keys, (feats, err, rest)))
            rows = patched.any(1).nonzero().flatten()
            out = a.clone()
            w = self._w_dec(feats.dtype)[self.kept.to(feats.device)]
            out[rows] = (feats[rows] @ w + rest[rows] + err[rows] + self.bias(a.dtype, a.device)).to(a.dtype)
            return out

        return {where.hook: fn}



def activating_tokens(result: Any, tokens: torch.Tensor, decode: Callable[[int], str], k: int = 3) -> dict[str, str]:
    """Kept feature -> the ``k`` distinct tokens of ``tokens`` (``[N, T]`` ids, e.g. the clean
    prompts) at which it is most active, most active first, as ``decode`` spells them (its label in
    the circuit picture: ``write_circuit_svg(..., notes=...)``). One forward pass per prompt."""
    ctx = result.context
    dictionaries = [w for w in ctx.graph.writers if isinstance(w, Dictionary)]
    hooks = {h for w in dictionaries for h in w.hooks()}
    with torch.no_grad():
        _, values = run(ctx.host, tokens, torch.ones_like(tokens, dtype=torch.bool), hooks)
    out = {}
    for w in dictionaries:
        with torch.no_grad():
            feats = w.record(values)[w.keys[0]]  # [N, T, kept]
        for j, sender in enumerate(w.senders[: w.n_kept]):
            found: list[str] = []
            for at in torch.argsort(feats[..., j].flatten(), descending=True).tolist():
                if float(feats[..., j].flatten()[at]) <= 0 or len(found) == k:
                    break
                word = decode(int(tokens.flatten()[at])).strip()
                if word not in found:
                    found.append(word)
            out[sender.name] = ", ".join(found)
    return out

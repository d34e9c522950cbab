"""Naive feature-edge references written with TransformerLens hooks and the dictionaries' own
``encode``/``decode`` (nothing from atp_plugin.edges).

The model copy of ``edge_reference.split_model`` exposes each head's query/key/value input and
write and the MLP's input residual (``hook_mlp_in``). A dictionary is (place, layer, sae, hook_in,
hook, kept): an SAE on ``hook_attn_out`` / ``hook_mlp_out`` (hook_in = hook) or a transcoder from
``ln2.hook_normalized`` into ``hook_mlp_out``. Its nodes, by the definition the docs give: kept
feature i writes f_i W_dec[i], the error writes a - decode(f), the rest writes the other features'
f_j W_dec[j]. Patching edge u -> v adds u's change of write d to the residual v alone reads:

* a head's q/k/v: d added at that head's ``hook_{q,k,v}_input``;
* the logits: d added at the last ``hook_resid_post``;
* a dictionary node at an MLP: the MLP's input residual x (``hook_mlp_in``) becomes x + d for it
  alone: its value is recomputed from ``ln2`` and ``mlp`` of x + d (the model's own modules; the
  transcoder's input, ln2's normalised input, by LayerNorm's formula), and ``hook_mlp_out`` gets
  the change of its write (every other node of the dictionary as it is);
* a node of an SAE on the residual stream (``hook_resid_pre``/``post``): recomputed from x + d at
  that hook, which gets the change of its write. Such an SAE is a bottleneck: no edge runs from a
  sender before it to a receiver after it.

``first_order`` is the derivative of that patched metric in the size of d at 0 (autograd), what
EAP estimates; ``exact`` the patched metric's change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dict:
    place: str  # "attn" | "mlp" | "resid"
    layer: int
    sae: object
    hook_in: str
    hook: str
    kept: list[int]

    @property
    def prefix(self) -> str:
        return self.hook.split(".")[-1][5:] + str(self.layer) if self.place == "resid" else f"{self.place}{self.layer}"

    @property
    def stage(self) -> float:
        """Heads of layer l write at 2l + 1, its MLP at 2l + 2; a residual SAE in between."""
        if self.place == "resid":
            return 2 * self.layer + (0.5 if self.hook.endswith("resid_pre") else 2.5)
        return 2 * self.layer + (1 if self.place == "attn" else 2)

    def nodes(self, u: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Node name -> its write ``[batch, pos, d_model]``."""
        f = self.sae.encode(u)
        out = {f"{self.prefix}.f{i}": f[..., i, None] * self.sae.W_dec[i] for i in self.kept}
        out[f"{self.prefix}.error"] = a - self.sae.decode(f)
        rest = f.clone()
        rest[..., self.kept] = 0
        out[f"{self.prefix}.rest"] = rest @ self.sae.W_dec
        return out

    def names(self) -> list[str]:
        return [f"{self.prefix}.f{i}" for i in self.kept] + [f"{self.prefix}.error", f"{self.prefix}.rest"]


def _normalized(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """ln2's normalised input (TransformerLens's ``ln2.hook_normalized``, LayerNorm)."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + model.blocks[layer].ln2.eps).sqrt()


def senders(model, dicts: list[Dict]) -> list[tuple[str, float]]:
    """(name, stage) of every sender in stage order."""
    at = {(d.place, d.layer): d for d in dicts if d.place != "resid"}
    out: list[tuple[str, float]] = [("embed", 0)]
    for layer in range(model.cfg.n_layers):
        d = at.get(("attn", layer))
        out += [(n, 2 * layer + 1) for n in d.names()] if d else \
            [(f"L{layer}.H{h}", 2 * layer + 1) for h in range(model.cfg.n_heads)]
        d = at.get(("mlp", layer))
        out += [(n, 2 * layer + 2) for n in d.names()] if d else [(f"mlp{layer}", 2 * layer + 2)]
    out += [(n, d.stage) for d in dicts if d.place == "resid" for n in d.names()]
    return sorted(out, key=lambda x: x[1])


def receivers(model, dicts: list[Dict]) -> list[tuple[str, float]]:
    at = {(d.place, d.layer): d for d in dicts if d.place != "resid"}
    out: list[tuple[str, float]] = []
    for layer in range(model.cfg.n_layers):
        out += [(f"L{layer}.H{h}.{w}", 2 * layer + 1) for w in "qkv" for h in range(model.cfg.n_heads)]
        d = at.get(("mlp", layer))
        out += [(n, 2 * layer + 2) for n in d.names()] if d else [(f"mlp{layer}", 2 * layer + 2)]
    out += [(n, d.stage) for d in dicts if d.place == "resid" for n in d.names()]
    return sorted(out + [("logits", 2 * model.cfg.n_layers + 1)], key=lambda x: x[1])


def edges(model, dicts: list[Dict]) -> list[tuple[str, str]]:
    """Sender before receiver, and no residual-stream SAE between them: it is a bottleneck (what
    was written before it reaches what reads after it only through its nodes)."""
    cuts = [d.stage for d in dicts if d.place == "resid"]
    return [(s, r) for r, rs in receivers(model, dicts) for s, ss in senders(model, dicts)
            if ss < rs and not any(ss < c < rs for c in cuts)]


def writes(ref, model, tokens: torch.Tensor, dicts: list[Dict]) -> dict[str, torch.Tensor]:
    """Every sender's write in the run of ``tokens``."""
    with torch.no_grad():
        _, cache = ref.run_with_cache(tokens)
    out = {"embed": cache["hook_embed"] + cache["hook_pos_embed"]}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            out[f"L{layer}.H{h}"] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
        out[f"mlp{layer}"] = cache[f"blocks.{layer}.hook_mlp_out"]
        for place in ("attn", "mlp", "resid"):
            for d in (x for x in dicts if (x.place, x.layer) == (place, layer)):
                with torch.no_grad():
                    out.update(d.nodes(cache[d.hook_in], cache[d.hook]))
    return out


def patched_metric(ref, model, tokens: torch.Tensor, dicts: list[Dict], receiver: str, d: torch.Tensor, metric
                   ) -> torch.Tensor:
    """The metric ``[batch]`` of ``tokens`` with ``d`` ``[batch, pos, d_model]`` added to what
    ``receiver`` alone reads."""
    hooks = []
    if receiver == "logits":
        hooks.append((f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", lambda x, hook: x + d))
    elif receiver.startswith("L"):
        layer, head, which = receiver[1:].split(".")
        h = int(head[1:])

        def add(x, hook):
            x = x.clone()
            x[:, :, h] = x[:, :, h] + d
            return x
        hooks.append((f"blocks.{layer}.hook_{which}_input", add))
    elif receiver.startswith("mlp") and "." not in receiver:  # an MLP without a dictionary: its input residual
        hooks.append((f"blocks.{receiver[3:]}.hook_mlp_in", lambda x, hook: x + d))
    elif receiver.startswith("resid"):  # a residual-stream SAE's node: recomputed at x + d, its write's change added
        dic = next(x for x in dicts if receiver in x.names())
        hooks.append((dic.hook, lambda x, hook: x + dic.nodes(x + d, x + d)[receiver] - dic.nodes(x, x)[receiver]))
    else:
        dic = next(x for x in dicts if receiver in x.names())
        layer, seen = dic.layer, {}
        block = model.blocks[layer]

        def grab(x, hook):
            seen[hook.name] = x
            return x

        def swap(a, hook):
            x = seen[f"blocks.{layer}.hook_mlp_in"]
            u = a if dic.hook_in == dic.hook else seen[dic.hook_in]
            x2 = x + d
            a2 = block.mlp(_normalized(model, layer, x2) * block.ln2.w + block.ln2.b)
            u2 = a2 if dic.hook_in == dic.hook else _normalized(model, layer, x2)
            return a + dic.nodes(u2, a2)[receiver] - dic.nodes(u, a)[receiver]
        hooks += [(f"blocks.{layer}.hook_mlp_in", grab), (dic.hook_in, grab), (dic.hook, swap)]
    return metric(ref.run_with_hooks(tokens, fwd_hooks=hooks))


def bound(metric):
    """``metric(logits, indices)`` of the pairs in order, as a function of the logits."""
    return lambda logits: metric(logits, torch.arange(len(logits)))


def effects(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, dicts: list[Dict], first_order: bool
            ) -> dict[str, tuple[float, float]]:
    """Edge name -> (mean over pairs of I, mean over pairs of |I|): the exact effect of patching
    the edge at every position, or (``first_order``) its derivative in the size of the change."""
    from edge_reference import split_model  # TransformerLens 3: Dict and bound serve TransformerLens 4 tests too
    ref = split_model(model)
    metric = bound(metric)
    w_clean, w_noise = writes(ref, model, clean, dicts), writes(ref, model, corrupt, dicts)
    with torch.no_grad():
        base = metric(ref(clean))
    out = {}
    for s, r in edges(model, dicts):
        d = w_noise[s] - w_clean[s]
        if first_order:
            eps = torch.zeros(len(clean), 1, 1, dtype=d.dtype, requires_grad=True)
            (i,) = torch.autograd.grad(patched_metric(ref, model, clean, dicts, r, eps * d, metric).sum(), eps)
            i = i.flatten()
        else:
            with torch.no_grad():
                i = patched_metric(ref, model, clean, dicts, r, d, metric) - base
        out[f"{s} -> {r}"] = (float(i.mean()), float(i.abs().mean()))
    return out

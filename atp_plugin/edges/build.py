"""Building the edge graph: the built-in writer and reader groups of the model's structure, with
dictionaries of features in place of the components they split."""

from __future__ import annotations

from typing import Sequence

import torch

from ..hosts.structure import Structure, check_structure, hook_names
from .features import Dictionary, Placement
from .graph import Graph, Receiver, Sender
from .groups import AttentionReads, HeadWrites, HookWrites, LogitReads, MLPReads, Values
from .values import receiver_hooks, sender_hooks


def build_graph(parts: Structure, dictionaries: Sequence[tuple[Placement, Sequence[int]]] = ()) -> Graph:
    """The edge graph of the model ``parts`` describes; ``dictionaries``: (where a dictionary sits,
    the features it keeps), at most one per component and one per point of the residual stream."""
    at = {(where.place, where.stage): (where, kept) for where, kept in dictionaries}
    if len(at) != len(dictionaries):
        raise ValueError("features= holds two dictionaries on one component or one point of the residual stream "
                         "(blocks.L.hook_resid_post and blocks.L+1.hook_resid_pre are one); give one SAE or "
                         "transcoder per place")
    n, gqa, group = parts.n_layers, parts.n_kv != parts.n_heads, parts.n_heads // parts.n_kv
    writers: list = [HookWrites((Sender("embed", "embed", -1, -1, 0),), hook_names(0).resid_pre)]
    readers: list = []
    count = 1  # senders so far

    def residual(stage: float) -> None:
        """A dictionary on the residual stream at ``stage``, if one sits there: it reads and writes there."""
        nonlocal count
        if ("resid", stage) in at:
            dictionary = Dictionary(parts, *at["resid", stage], stage, count)
            writers.append(dictionary)
            readers.append(dictionary)
            count += len(dictionary.senders)

    for layer in range(n):
        residual(2 * layer + 0.5)
        first = count  # this layer's attention writers are senders first ..
        writer: Dictionary | HeadWrites
        if ("attn", 2 * layer + 1) in at:
            writer = Dictionary(parts, *at["attn", 2 * layer + 1], 2 * layer + 1, first)
        else:
            writer = HeadWrites(tuple(Sender(f"L{layer}.H{h}", "head", layer, h, 2 * layer + 1)
                                      for h in range(parts.n_heads)), parts, layer)
        writers.append(writer)
        count += len(writer.senders)
        whole = tuple(range(first, count))  # a dictionary's nodes all write through every read of the layer
        heads = [(first + h,) for h in range(parts.n_heads)] if isinstance(writer, HeadWrites) else None
        receivers = [Receiver(f"L{layer}.H{h}.q", "q", layer, h, 2 * layer + 1, heads[h] if heads else whole)
                     for h in range(parts.n_heads)]
        for which in "kv":
            receivers += [Receiver(f"L{layer}.{'KV' if gqa else 'H'}{j}.{which}", which, layer, j, 2 * layer + 1,
                                   tuple(range(first + j * group, first + (j + 1) * group)) if heads else whole,
                                   across=True)
                          for j in range(parts.n_kv)]
        attention = AttentionReads(tuple(receivers), parts, layer)
        readers.append(attention)
        if parts.attn_only:
            continue
        stage = 2 * layer + (1 if parts.parallel else 2)
        if ("mlp", 2 * layer + 2) in at:
            dictionary = Dictionary(parts, *at["mlp", 2 * layer + 2], stage, count,
                                    attention if parts.parallel else None)
            writers.append(dictionary)
            readers.append(dictionary)
            count += len(dictionary.senders)
        else:
            writers.append(HookWrites((Sender(f"mlp{layer}", "mlp", layer, -1, 2 * layer + 2),),
                                      hook_names(layer).mlp_out))
            readers.append(MLPReads((Receiver(f"mlp{layer}", "mlp", layer, -1, stage, (count,)),), parts, layer,
                                    attention if parts.parallel else None))
            count += 1
    residual(2 * n + 0.5)
    readers.append(LogitReads((Receiver("logits", "logits", n, -1, 2 * n + 1),), n))
    senders = tuple(s for w in writers for s in w.senders)
    cuts = tuple(sorted(stage for place, stage in at if place == "resid"))
    return Graph(senders, tuple(r for g in readers for r in g.receivers), n, parts.n_heads, parts.n_kv,
                 parts.d_model, cuts, tuple(writers), tuple(readers))


def check_hooks(parts: Structure, graph: Graph) -> set[str]:
    """The hooks ``check_graph`` reads."""
    out = sender_hooks(graph) | receiver_hooks(graph)
    for layer in range(parts.n_layers):
        h = hook_names(layer)
        out |= {h.resid_pre, h.resid_post, h.z, h.qkv("q"), h.qkv("k"), h.qkv("v")}
        if not parts.attn_only:
            out.add(h.mlp_out)
    return out


def check_graph(parts: Structure, graph: Graph, values: Values, mask: torch.Tensor) -> None:
    """Check on one run's values (``check_hooks``) that the host's structure reproduces the model
    (``hosts.structure.check_structure``) and that each dictionary's nodes are what the graph assumes."""
    check_structure(parts, values, mask)
    for w in graph.writers:
        if isinstance(w, Dictionary):
            w.check(values, mask)

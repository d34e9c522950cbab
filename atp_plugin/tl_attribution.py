"""A one-import swap for TransformerLens's own attribution patching
(``transformer_lens.tools.analysis.attribution_patching.attribution_patch``, TransformerLens 4.3):

    from atp_plugin.tl_attribution import attribution_patch   # instead of the TransformerLens import
    result = attribution_patch(model, clean, corrupt, metric_fn)          # AtP*, node granularity
    result = attribution_patch(model, clean, corrupt, metric_fn, method="atp")   # its numbers

Same arguments, same return type (TransformerLens's ``AttributionResult`` with ``node_scores``
keyed by its ``Node``: ``embed``, ``attn_head_out`` and ``mlp_out`` at every position), computed by
this library's engine for all pairs in batches instead of one pair at a time.

Conventions: TransformerLens takes gradients on the *corrupt* run and estimates patching each node
from corrupt toward clean (``(a_clean - a_corrupt) . dL/da |corrupt``). That is ``attribute()``
with the two prompt lists swapped, which is what this function runs: with ``method="atp"`` the
scores equal TransformerLens's (signed, means over pairs). ``attribute()``'s own convention
patches corrupt into clean, so its ``signed`` values for the same prompts are the opposite
direction's estimate. With ``method="atp*"`` (the default) or ``"atp+gd"`` the scores are
GradDrop's means of per-pair magnitudes, >= 0: rank by them, they carry no sign. An head output's
estimate equals that of its ``hook_z`` (the write is linear in z), so heads are scored at ``hook_z``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .attribution import attribute
from .errors import MissingDependencyError

METHODS = ("atp*", "atp", "atp+gd", "atp+qk")


def _tl() -> Any:
    try:
        from transformer_lens.tools.analysis import attribution_patching
    except ImportError as e:
        raise MissingDependencyError("attribution_patch() returns TransformerLens's own result types, which this "
                                     f"TransformerLens lacks ({e}); install transformer-lens>=4.3") from e
    return attribution_patching


def attribution_patch(model: Any, clean: torch.Tensor, corrupt: torch.Tensor,
                      metric_fn: Callable[[torch.Tensor], torch.Tensor], config: Any = None, *,
                      method: str = "atp*", batch_size: int | None = None) -> Any:
    """TransformerLens's ``attribution_patch`` computed by atp-plugin (see the module docstring).

    ``metric_fn`` maps one example's logits ``[1, seq, vocab]`` to a scalar, as TransformerLens
    expects; ``config`` is its ``EdgeAttributionConfig`` (node granularity; for edges use
    ``atp_plugin.edges.attribute_edges``)."""
    tl = _tl()
    config = tl.EdgeAttributionConfig() if config is None else config
    if config.granularity != "node":
        raise ValueError(f"granularity={config.granularity!r}: this swap covers node granularity; for edge scores "
                         "(with exact verification and faithfulness) use atp_plugin.edges.attribute_edges")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def per_pair(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([metric_fn(logits[i:i + 1]).reshape(()) for i in range(logits.shape[0])])

    # TransformerLens's direction: gradients on the corrupt run, toward the clean values
    result = attribute(model, corrupt, clean, per_pair, nodes=["embed", "attn_z", "mlp_out"], method=method,
                       batch_size=batch_size)
    values = result.signed if method in ("atp", "atp+qk") else result.scores
    embed, heads, mlps = (values[k].double().cpu() for k in ("embed", "attn_z", "mlp_out"))
    scores: dict[Any, float] = {}
    for pos in range(embed.shape[0]):
        scores[tl.Node("embed", pos)] = float(embed[pos])
        for layer in range(heads.shape[0]):
            for head in range(heads.shape[2]):
                scores[tl.Node("attn_head_out", pos, layer, head)] = float(heads[layer, pos, head])
            scores[tl.Node("mlp_out", pos, layer)] = float(mlps[layer, pos])
    return tl.AttributionResult(node_scores=scores)

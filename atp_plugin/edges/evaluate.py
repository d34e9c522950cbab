"""Cost-of-verification curves for edge methods, as ``atp_plugin.evaluate`` draws them for nodes.

A method ranks the edges; a user verifies edges by exact single-edge patching in that order. The
cost to have found the true top-x edges (by exhaustive edge patching, ``ap``) is the method's own
cost plus one patched forward pass per pair for every edge down to the last of the true top x in
the method's order. Units: forward passes of one prompt, a backward pass counting
``BACKWARD_COST``; ties broken by one random permutation shared by all methods.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import plugins
from ..attribution import DEFAULT_BATCH, eval_mode
from ..evaluate import BACKWARD_COST, rank_order
from .attribute import attribute_edges, make_context
from .features import Keep, kept_of
from .result import EdgeResult


def cost_of(result: EdgeResult) -> float:
    """An edge result's own cost: forward passes + ``BACKWARD_COST`` x backward passes."""
    return result.forward_passes + BACKWARD_COST * result.backward_passes


def evaluate_edges(model: Any, clean, corrupt, metric, *, methods: Sequence[str] = ("atp", "atp+qk", "ig"),
                   ig_steps: int = 5, top_x: int = 20, per_position: bool = False, seed: int = 0,
                   batch_size: int | None = None, features: Sequence[Any] = (), keep: Keep = 20
                   ) -> tuple[pd.DataFrame, EdgeResult]:
    """Cost-of-verification curves of the edge ``methods`` against exhaustive edge patching.

    Returns the curves (index ``x`` = 0..top_x, row 0 each method's own cost; one column per method
    plus ``"oracle"``, which verifies exactly the true top x for free) and the ``ap`` result.
    ``features``/``keep`` as in ``attribute_edges``: the kept features are chosen once, and the node
    run that chose them is part of every method's own cost.
    """
    registered = plugins.edge_methods()
    unknown = [m for m in methods if m not in registered or m == "ap"]
    if unknown or not methods:
        known = ", ".join(m for m in registered if m != "ap")
        raise ValueError(f"methods must be edge methods other than 'ap' ({known}), got {list(methods)!r}")
    options: dict[str, Any] = dict(ig_steps=ig_steps, per_position=per_position, batch_size=batch_size, progress=False)
    choosing = 0.0
    if features:
        with eval_mode(model, "evaluate_edges()"):
            ctx = make_context(model, clean, corrupt, metric, batch_size=batch_size or DEFAULT_BATCH, progress=False,
                               features=features, keep=keep)
        choosing = ctx.forward_passes + BACKWARD_COST * ctx.backward_passes
        options.update(features=features, keep=kept_of(ctx.graph))
    truth = attribute_edges(model, clean, corrupt, metric, method="ap", **options)
    n = truth.scores.numel()
    if not 1 <= top_x <= n:
        raise ValueError(f"top_x must be between 1 and the {n} edges, got {top_x}")
    tiebreak = np.random.default_rng(seed).permutation(n)
    true_top = rank_order(truth.scores.double().reshape(-1).numpy(), tiebreak)[:top_x]
    curves = {}
    for method in methods:
        result = attribute_edges(model, clean, corrupt, metric, method=method, **options)
        position = np.empty(n, dtype=np.int64)
        position[rank_order(result.scores.double().reshape(-1).numpy(), tiebreak)] = np.arange(1, n + 1)
        spent = truth.n_pairs * np.maximum.accumulate(position[true_top])
        curves[method] = np.concatenate([[0.0], spent]) + cost_of(result) + choosing
    curves["oracle"] = truth.n_pairs * np.arange(top_x + 1, dtype=float)
    return pd.DataFrame(curves, index=pd.Index(np.arange(top_x + 1), name="x")), truth

"""Verification: exact patching of a result's top nodes, batched."""

from __future__ import annotations

import numbers
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import torch

from .attribution import eval_mode

if TYPE_CHECKING:  # annotations only: result.py imports this module when verify() is called
    from .result import AttributionResult


def locate(result: AttributionResult, frame: pd.DataFrame) -> dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]]:
    """Node rows of ``frame`` (from ``result.to_frame()``) -> the engine's (site number, group)
    -> (positions of those rows in ``frame``, flat indices into the site's ``[pos, *node]``)."""
    engine = result.require_engine("locating nodes")
    site_of = {(id(s.adapter), s.index): n for n, s in enumerate(engine.sites())}
    out: dict[tuple[int, str], tuple[list, list]] = {}
    for node_type, rows in frame.groupby("node_type", sort=False).indices.items():
        adapter, grp = engine.keys()[node_type]
        dims = result.dims[node_type]
        shape = tuple(result.scores[node_type].shape)
        coords = np.stack([frame[c].iloc[rows].to_numpy(dtype=np.int64) for c in dims])  # [dims, rows]
        layered = dims[0] == "layer"
        flat = np.ravel_multi_index(tuple(coords[1:] if layered else coords), shape[1:] if layered else shape)
        layers = coords[0] if layered else np.zeros(len(rows), dtype=np.int64)
        for layer in np.unique(layers):
            sel = layers == layer
            got = out.setdefault((site_of[id(adapter), int(layer)], grp), ([], []))
            got[0].append(rows[sel])
            got[1].append(flat[sel])
    return {key: (np.concatenate(r), torch.from_numpy(np.concatenate(f))) for key, (r, f) in out.items()}


def exact_effects_of(result: AttributionResult, frame: pd.DataFrame, desc: str = "verifying"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact effect of every node row of ``frame``, in row order: the mean over pairs ``[rows]``
    and the mean over pairs of its magnitude ``[rows]``."""
    located = locate(result, frame)
    engine = result.require_engine("exact patching")
    effects = engine.exact_effects({key: flat for key, (_, flat) in located.items()}, desc=desc)
    out = np.empty((2, len(frame)))
    for key, (rows, _) in located.items():
        for i in (0, 1):
            out[i, rows] = effects[i][key].double().cpu().numpy()
    return out[0], out[1]


def check_k(k: Any, unit: str) -> None:
    """Fail unless ``k`` is a positive int: a number of ``unit``s (nodes, edges)."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int (a number of {unit}s), got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1 (a number of {unit}s), got {k}")


def verified(top: pd.DataFrame, k: int, n: int, unit: str, model: Any,
             exact: Callable[[], tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """``top`` (a result's top ``k`` of its ``n`` ``unit``s) with its estimates beside the exact
    effects ``exact()`` gives, run with ``model`` in eval mode: the verification table nodes and
    edges share. ``k`` above ``n`` verifies them all, with a warning."""
    if k > n:
        warnings.warn(f"k={k} is more than the {n} {unit}s of this result; verifying all {n} (k clamped to {n})",
                      stacklevel=3)
    out = top.drop(columns=["score", "signed"]).reset_index(drop=True)
    out["estimate"], out["signed_estimate"] = top["score"].to_numpy(), top["signed"].to_numpy()
    with eval_mode(model, "verify()"):
        effect, mean_abs = exact()
    out["effect"], out["abs_effect"], out["mean_abs_effect"] = effect, np.abs(effect), mean_abs
    return out


def verify(result: AttributionResult, k: int = 10) -> pd.DataFrame:
    """The top ``k`` nodes of ``result`` with their exact effects, patched in eval mode (a model in
    training mode is switched, with a warning, and restored). ``k`` above the number of nodes
    verifies them all, with a warning.

    Columns: ``estimate`` (the score) and ``signed_estimate`` beside ``effect`` (mean over pairs of
    the exact effect I), ``abs_effect`` = |effect| (what ``ap`` scores) and ``mean_abs_effect`` (mean
    over pairs of |I|: what the AtP scores, means of per-pair magnitudes, estimate; it exceeds
    ``abs_effect`` where a node's effect changes sign between pairs)."""
    engine = result.require_engine("verify()")
    top = result.top(k)
    n_nodes = sum(score.numel() for score in result.scores.values())
    return verified(top, k, n_nodes, "node", engine.host.model, lambda: exact_effects_of(result, top))

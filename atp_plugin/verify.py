"""Verification: exact patching of a result's top nodes, batched."""

from __future__ import annotations

import math

import pandas as pd
import torch


def locate(result, row) -> tuple[tuple[int, str], int]:
    """A frame row -> the engine's (site number, group) and flat index into its ``[pos, *node]``."""
    engine = result.engine
    adapter, grp = engine.keys()[row.node_type]
    dims = result.dims[row.node_type]
    layer = int(row.layer) if dims[0] == "layer" else 0
    n = next(i for i, s in enumerate(engine.sites()) if s.adapter is adapter and s.index == layer)
    inner = dims[1:] if dims[0] == "layer" else dims
    shape = tuple(result.scores[row.node_type].shape[len(dims) - len(inner):])
    flat = sum(int(getattr(row, c)) * math.prod(shape[i + 1:]) for i, c in enumerate(inner))
    return (n, grp), flat


def exact_effects_of(result, frame: pd.DataFrame, desc: str = "verifying") -> list[float]:
    """Exact effect (mean over pairs) of every node row of ``frame``, in row order."""
    located = [locate(result, row) for row in frame.itertuples(index=False)]
    refs: dict[tuple[int, str], list[int]] = {}
    for key, flat in located:
        refs.setdefault(key, []).append(flat)
    effects = result.engine.exact_effects({k: torch.tensor(v) for k, v in refs.items()}, desc=desc)
    walk = {k: iter(v.tolist()) for k, v in effects.items()}
    return [next(walk[key]) for key, _ in located]


def verify(result, k: int = 10) -> pd.DataFrame:
    """The top ``k`` nodes of ``result`` with their exact effects (mean over pairs)."""
    if result.engine is None:
        raise ValueError("this result cannot be verified: it has no engine (a summed-over-positions view); "
                         "verify the per-position result returned by attribute()")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    top = result.top(k)
    if "pad" in top:
        top = top[top["pad"].ne(True)]  # padding positions have no nodes
    out = top.drop(columns=["score", "signed", "pad"], errors="ignore").copy()
    out["estimate"] = top["score"].to_numpy()
    out["signed_estimate"] = top["signed"].to_numpy()
    out["effect"] = exact_effects_of(result, top)
    out["abs_effect"] = out["effect"].abs()
    return out.reset_index(drop=True)

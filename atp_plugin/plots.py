"""Figures: layer x head heatmaps of a result's scores (matplotlib, written as PNG).

Figures are drawn on ``matplotlib.figure.Figure`` objects and saved directly, without pyplot: the
library never selects or switches matplotlib's backend, and no figure is left open in pyplot.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from .result import AttributionResult


def layer_heatmap(result: AttributionResult, key: str, path: str | Path, *, title: str | None = None) -> Path:
    """A heatmap of ``result.scores[key]`` summed over positions (layer x head/neuron/...).

    Per-head scores summed over positions rank components; the per-position scores stay in the
    result for node-level work.
    """
    summed = result.sum_over_positions()
    scores = summed.scores[key].detach().double().cpu()
    dims = summed.dims[key]
    if scores.ndim == 1:
        scores = scores[None]
    return heatmap(scores, path, xlabel=dims[-1] if len(dims) > 1 else "", ylabel=dims[0] if len(dims) > 1 else "",
                   title=title or f"{key}: {result.method} score, summed over positions")


def heatmap(values: torch.Tensor, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Draw a ``[rows, cols]`` matrix as a PNG heatmap with a colour bar; returns the path."""
    values = values.detach().double().cpu()
    fig = Figure(figsize=(max(4.0, 1.2 + 0.45 * min(values.shape[1], 40)),
                          1.0 + 0.45 * min(values.shape[0], 40)))  # wide enough for the title
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(0, values.shape[1], max(1, values.shape[1] // 20)))
    ax.set_yticks(range(0, values.shape[0], max(1, values.shape[0] // 20)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

"""Figures: layer x head heatmaps of a result's scores (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .result import AttributionResult  # noqa: E402


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
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * scores.shape[1], 1.0 + 0.45 * scores.shape[0]))
    image = ax.imshow(scores.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel(dims[-1] if len(dims) > 1 else "")
    ax.set_ylabel(dims[0] if len(dims) > 1 else "")
    ax.set_xticks(range(scores.shape[1]))
    ax.set_yticks(range(scores.shape[0]))
    ax.set_title(title or f"{key}: {result.method} score, summed over positions", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""AttributionResult: scores per node type, tables, and verification by exact patching."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch


@dataclass
class AttributionResult:
    """Scores of one method over the requested node types.

    ``scores[key]`` / ``signed[key]``: tensors with the dimensions ``dims[key]`` (e.g.
    ``("layer", "pos", "head")``); ``key`` is the node type name (plus ``".error"`` for SAE error
    nodes). ``pairs[pos]``: in how many pairs the position is a real token; with left-padded
    prompts of different lengths the early positions are padding in the shorter pairs, have no
    nodes there, and their scores are means over fewer pairs.
    """

    method: str
    scores: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    dims: dict[str, tuple[str, ...]]
    pairs: torch.Tensor  # [pos] int
    alignment: str
    n_pairs: int
    view: str = "per position"
    engine: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        """What the result holds, not its numbers (a notebook cell would otherwise print every tensor)."""
        lines = [f"AttributionResult(method={self.method!r}, {self.n_pairs} pair(s), {self.view}; {self.alignment})"]
        for key, score in self.scores.items():
            shape = ", ".join(f"{d}={n}" for d, n in zip(self.dims[key], score.shape))
            lines.append(f"  {key}: [{shape}]")
        lines.append("  see .top(k), .to_frame()" + (", .verify(k)" if self.view == "per position" else ""))
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        """One row per node: node_type, its coordinates (layer, pos, head/neuron/feature, …),
        score, signed, and ``pairs`` (in how many pairs the node's position is a real token, not
        left padding). ``attrs`` carry the ``method``, the ``view`` and the prompts' ``alignment``."""
        frames = []
        for key, score in self.scores.items():
            dims = self.dims[key]
            grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in score.shape], indexing="ij"), -1)
            frame = pd.DataFrame(grid.reshape(-1, len(dims)).numpy(), columns=list(dims))
            frame.insert(0, "node_type", key)
            frame["score"] = score.detach().double().reshape(-1).cpu().numpy()
            frame["signed"] = self.signed[key].detach().double().reshape(-1).cpu().numpy()
            if "pos" in dims:
                frame["pairs"] = self.pairs.cpu().numpy()[frame["pos"].to_numpy()]
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
        coords = [c for c in ("layer", "pos") if c in frame] + [
            c for c in frame.columns if c not in ("node_type", "layer", "pos", "score", "signed", "pairs")]
        for c in coords:
            frame[c] = frame[c].astype("Int64")
        frame.insert(1, "node", [_label(row, coords) for row in frame[["node_type"] + coords].itertuples(index=False)])
        frame.attrs["view"] = self.view
        frame.attrs["method"] = self.method
        frame.attrs["alignment"] = self.alignment
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` nodes with the largest scores, largest first."""
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise TypeError(f"k must be an int (a number of nodes), got {k!r}")
        if k < 1:
            raise ValueError(f"k must be at least 1 (a number of nodes), got {k}")
        return self.to_frame().nlargest(k, "score")

    def sum_over_positions(self) -> "AttributionResult":
        """A view with scores and signed values summed over positions, labelled as such
        (``view == "summed over positions"``); it cannot be verified node by node."""
        def drop_pos(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.sum(self.dims[k].index("pos")) if "pos" in self.dims[k] else v for k, v in t.items()}
        dims = {k: tuple(d for d in v if d != "pos") for k, v in self.dims.items()}
        return AttributionResult(self.method, drop_pos(self.scores), drop_pos(self.signed), dims, self.pairs,
                                 self.alignment, self.n_pairs, view="summed over positions")

    def verify(self, k: int = 10) -> pd.DataFrame:
        """Exact patching of the top ``k`` nodes: the estimate beside the true effect (signed mean
        over pairs, ``effect``, its magnitude ``abs_effect`` and the mean over pairs of the per-pair
        magnitude, ``mean_abs_effect``); see ``atp_plugin.verify.verify``."""
        from .verify import verify
        return verify(self, k)


def _label(row: tuple, coords: list[str]) -> str:
    node_type, *values = row
    short = {"layer": "L", "pos": "@", "head": "H", "neuron": "N", "feature": "F"}
    parts = [f"{short.get(c, c + '=')}{v}" for c, v in zip(coords, values) if not pd.isna(v)]
    return f"{node_type} " + " ".join(parts)

"""AttributionResult: scores per node type, tables, and verification by exact patching."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:  # annotations only: the result module does not import the engine at run time
    from .engine import Engine


@dataclass
class AttributionResult:
    """Scores of one method over the requested node types.

    ``scores[key]`` / ``signed[key]``: tensors with the dimensions ``dims[key]`` (e.g.
    ``("layer", "pos", "head")``); ``key`` is the node type name (plus ``".error"`` for SAE error
    nodes). ``pair_counts[pos]``: in how many pairs the position is a real token; with
    left-padded prompts of different lengths the early positions are padding in the shorter pairs,
    have no nodes there, and their scores are means over fewer pairs. ``engine``: what computed the
    scores, kept so that verification and the bound patch the same model, pairs and metric (None
    for a summed-over-positions view).
    """

    method: str
    scores: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    dims: dict[str, tuple[str, ...]]
    pair_counts: torch.Tensor  # [pos] int
    alignment: str
    n_pairs: int
    view: str = "per position"
    engine: Engine | None = field(default=None, repr=False)
    #: per key, the standard error over pairs of each score (a mean over pairs), from running
    #: moments (Welford); None for methods that give none (``ap``, plugins that return two dicts)
    std_error: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def require_engine(self, what: str) -> Engine:
        """The engine, or a ValueError saying that ``what`` needs the per-position result returned
        by ``attribute()`` (a summed-over-positions view has none)."""
        if self.engine is None:
            raise ValueError(f"{what} needs the per-position result returned by attribute(), which keeps the "
                             "engine; this is a summed-over-positions view")
        return self.engine

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
        return self._frame({key: torch.arange(score.numel()) for key, score in self.scores.items()})

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` nodes with the largest scores, largest first (ties in node order). Selected on
        the score tensors, so only ``k`` rows are built, whatever the number of nodes."""
        from .verify import check_k
        check_k(k, "node")
        keys = list(self.scores)
        sizes = torch.tensor([self.scores[key].numel() for key in keys])
        starts = sizes.cumsum(0) - sizes  # [keys]: where each key's rows start in to_frame()
        values, found = [], []  # each key's own top k, then the top k of those
        for key, start in zip(keys, starts.tolist()):
            score = self.scores[key].detach().reshape(-1).nan_to_num(nan=-math.inf)
            v, i = torch.topk(score, min(int(k), len(score)))
            values.append(v.double().cpu())
            found.append(i.cpu() + start)
        value, candidate = torch.cat(values), torch.cat(found)
        order = sorted(range(len(candidate)), key=lambda j: (-float(value[j]), int(candidate[j])))[: int(k)]
        picked = candidate[order]  # [k] row numbers in to_frame(), largest score first
        owner = torch.searchsorted(sizes.cumsum(0), picked, right=True)  # [k]
        mine = {i: owner == i for i in owner.unique().tolist()}
        frame = self._frame({keys[i]: picked[sel] - starts[i] for i, sel in mine.items()})
        # index: each row's number in to_frame(), as nlargest would keep it; rows in rank order
        frame.index = torch.cat([picked[sel] for sel in mine.values()]).numpy()
        return frame.loc[picked.numpy()]

    def _frame(self, nodes: dict[str, torch.Tensor]) -> pd.DataFrame:
        """Rows for the given flat node indices of each result key, in that order; columns:
        node_type, node, layer, pos, other coordinates, score, signed, pairs."""
        frames = []
        for key, flat in nodes.items():
            score, dims = self.scores[key], self.dims[key]
            grid = np.unravel_index(flat.numpy(), tuple(score.shape)) if dims else ()
            at = np.stack(grid, -1) if dims else np.zeros((len(flat), 0), dtype=np.int64)  # [rows, dims]
            frame = pd.DataFrame(at, columns=list(dims))
            frame.insert(0, "node_type", key)
            index = flat.to(score.device)
            frame["score"] = score.detach().reshape(-1)[index].double().cpu().numpy()
            frame["signed"] = self.signed[key].detach().reshape(-1)[index].double().cpu().numpy()
            if self.std_error is not None:
                frame["std_error"] = self.std_error[key].detach().reshape(-1)[index].double().cpu().numpy()
            if "pos" in dims:
                frame["pairs"] = self.pair_counts.cpu().numpy()[frame["pos"].to_numpy()]
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
        names = list(dict.fromkeys(d for key in self.scores for d in self.dims[key]))  # every key's, so that
        coords = [c for c in ("layer", "pos") if c in names] + [  # top(k) has to_frame()'s columns
            c for c in names if c not in ("layer", "pos")]
        frame = frame.reindex(columns=[*frame.columns, *[c for c in coords if c not in frame]])
        for c in coords:
            frame[c] = frame[c].astype("Int64")
        frame.insert(1, "node", [_label(row, coords) for row in frame[["node_type"] + coords].itertuples(index=False)])
        tail = ["score", "signed"] + (["pairs"] if any("pos" in d for d in self.dims.values()) else []) + (
            ["std_error"] if self.std_error is not None else [])
        frame = frame.reindex(columns=[*frame.columns, *[c for c in tail if c not in frame]])
        frame = frame[["node_type", "node", *coords, *tail]]
        frame.attrs["view"] = self.view
        frame.attrs["method"] = self.method
        frame.attrs["alignment"] = self.alignment
        return frame

    def sum_over_positions(self) -> "AttributionResult":
        """A view with scores and signed values summed over positions, labelled as such
        (``view == "summed over positions"``); it cannot be verified node by node."""
        def drop_pos(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.sum(self.dims[k].index("pos")) if "pos" in self.dims[k] else v for k, v in t.items()}
        dims = {k: tuple(d for d in v if d != "pos") for k, v in self.dims.items()}
        return AttributionResult(self.method, drop_pos(self.scores), drop_pos(self.signed), dims, self.pair_counts,
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

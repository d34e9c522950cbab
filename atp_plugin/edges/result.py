"""EdgeResult: scores per edge (per position or over all positions), tables and verification."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..verify import check_k, verified
from .context import Context
from .graph import Graph


@dataclass
class EdgeResult:
    """Scores of one method for every edge of ``graph``.

    ``scores`` / ``signed``: ``[edge]`` (``per_position=False``: each edge patched at every position
    at once, the view EAP reports) or ``[edge, pos]``; edge i is ``graph.names[i]``. Scores are means
    over pairs of |I| (``ap``: |mean I|), ``signed`` the means of I. ``pairs[pos]``: in how many pairs
    the position is a real token. ``forward_passes`` / ``backward_passes``: what the method cost,
    counted per prompt.
    """

    method: str
    graph: Graph
    scores: torch.Tensor
    signed: torch.Tensor
    per_position: bool
    pairs: torch.Tensor
    n_pairs: int
    alignment: str
    forward_passes: int
    backward_passes: float
    context: Context = field(repr=False)

    def __repr__(self) -> str:
        view = "per position" if self.per_position else "each edge at every position"
        return (f"EdgeResult(method={self.method!r}, {self.graph.n_edges} edges, {self.n_pairs} pair(s), {view}; "
                f"{self.alignment})\n  see .top(k), .to_frame(), .verify(k)")

    def to_frame(self) -> pd.DataFrame:
        """One row per edge (per edge and position with ``per_position``): ``edge`` ("sender ->
        receiver"), ``sender``, ``receiver``, [``pos``, ``pairs``], ``score``, ``signed``."""
        g = self.graph
        names = np.array(g.names, dtype=object)
        senders = np.array([g.senders[s].name for s in g.sender_index.tolist()], dtype=object)
        receivers = np.array([g.receivers[r].name for r in g.receiver_index.tolist()], dtype=object)
        if self.per_position:
            t = self.scores.shape[1]
            frame = pd.DataFrame({"edge": np.repeat(names, t), "sender": np.repeat(senders, t),
                                  "receiver": np.repeat(receivers, t), "pos": np.tile(np.arange(t), len(names))})
            frame["pairs"] = self.pairs.cpu().numpy()[frame["pos"].to_numpy()]
        else:
            frame = pd.DataFrame({"edge": names, "sender": senders, "receiver": receivers})
        frame["score"] = self.scores.detach().double().reshape(-1).cpu().numpy()
        frame["signed"] = self.signed.detach().double().reshape(-1).cpu().numpy()
        frame.attrs.update(method=self.method, per_position=self.per_position, alignment=self.alignment)
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` edges (edge-positions) with the largest scores, largest first."""
        check_k(k, "edge")
        return self.to_frame().nlargest(k, "score")

    def verify(self, k: int = 10) -> pd.DataFrame:
        """Exact single-edge patching of the top ``k``: ``estimate`` / ``signed_estimate`` beside
        ``effect`` (mean over pairs of the exact I), ``abs_effect`` = |effect| and ``mean_abs_effect``
        (mean over pairs of |I|, what the first-order scores estimate), as ``AttributionResult.verify``
        gives for nodes. ``attrs["forward_passes"]``: the forward passes the verification ran (of one
        prompt each)."""
        top = self.top(k)
        rows = top.index.to_numpy()
        t = self.scores.shape[1] if self.per_position else 1
        edges = torch.from_numpy(rows // t)
        pos = torch.from_numpy(rows % t) if self.per_position else torch.full((len(rows),), -1)
        before = self.context.forward_passes

        def exact() -> tuple[np.ndarray, np.ndarray]:
            effect, mean_abs = self.context.edge_effects(edges, pos, desc="verifying edges")
            return effect.double().numpy(), mean_abs.double().numpy()

        out = verified(top, k, self.scores.numel(), "edge", self.context.host.model, exact)
        out.attrs["forward_passes"] = self.context.forward_passes - before
        return out

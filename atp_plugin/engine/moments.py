"""Running mean and variance over pairs (Welford, merged a batch at a time by Chan et al.'s
formula), per node, counting only the pairs where the node's position is real."""

from __future__ import annotations

import torch

from . import distributed


class Moments:
    """Mean and sum of squared deviations ``M2`` of per-pair values ``[pos, *node]``, updated
    from batches ``[batch, pos, *node]`` with a mask ``[batch, pos]`` (False: no node there)."""

    def __init__(self) -> None:
        self.n: torch.Tensor | None = None  # [pos]
        self.mean = torch.zeros(())
        self.m2 = torch.zeros(())

    def add(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge one batch: its own mean and M2 (two passes over the batch), then Chan's update."""
        m = mask.to(values.dtype).reshape(mask.shape + (1,) * (values.ndim - 2))  # [batch, pos, 1...]
        n_b = m.sum(0)  # [pos, 1...]
        mean_b = (values * m).sum(0) / n_b.clamp(min=1)
        m2_b = (((values - mean_b) * m) ** 2).sum(0)
        if self.n is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n.clamp(min=1)
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n.clamp(min=1)
        self.n = n

    def std_error(self) -> torch.Tensor:
        """The standard error of the mean over pairs, sqrt(M2 / (n - 1) / n), merged over the ranks
        of a ``torch.distributed`` run; NaN where fewer than two pairs have the position."""
        assert self.n is not None, "no batch was added"
        n = distributed.all_sum(self.n.clone())
        mean = distributed.all_sum(self.mean * self.n) / n.clamp(min=1)
        m2 = distributed.all_sum(self.m2 + self.n * (self.mean - mean) ** 2)
        se = (m2 / (n - 1).clamp(min=1) / n.clamp(min=1)).sqrt()
        return torch.where(n >= 2, se, torch.full_like(se, float("nan")))

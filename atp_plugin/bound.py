"""The false-negative bound (docs/method.md, "Verification and the false-negative bound").

After verifying the top ``k`` nodes of a result by exact patching, how large could the effect of
a node left unverified be? Patch random subsets of the remaining nodes jointly (each included
with probability ``p``), estimate every node's effect by subsampling (mean effect over subsets
that contain it minus over subsets that do not, ``backends.baselines.subsample``) and test, per
node n, H0(n): |I(n)| >= theta against H1: |I(n)| < theta.

The test per node is two one-sided Welch t-tests (TOST, an equivalence test): with estimate d,
standard error se and Welch degrees of freedom nu,

    p_n(theta) = max( F_nu((d - theta) / se),  1 - F_nu((d + theta) / se) )

(F_nu the Student t CDF): the first rejects I >= theta, the second I <= -theta; H0(n) is their
union, so the larger p-value is a valid p-value for it. Claiming "no unverified node has
|I| >= theta" means rejecting every H0(n); if some node n* has |I(n*)| >= theta, the claim is
wrong only if H0(n*) was rejected, which happens with probability at most p_n*(theta) <=
max_n p_n(theta) (an intersection-union test: no multiple-comparison correction is needed). So
max_n p_n(theta) bounds the probability that any unverified node has |I| >= theta.

p_n falls as theta grows, and p_n(theta) <= alpha = 1 - confidence exactly when
theta >= |d| + q se, q = F_nu^{-1}(confidence). The smallest theta rejected for every node is
therefore, in closed form, theta* = max_n (|d_n| + q_n se_n): "with 95% confidence no unverified
node has an effect above theta*". The t-approximation is asymptotic (it assumes the mean of each
side is close to normal); with few subsets per side the bound is approximate.

What is bounded is the subsampling estimand: the mean effect of adding the node to a random
subset of the others. Where effects add (no interactions) it equals I(n) and the bound is exact
in that sense; with interactions (attention, LayerNorm, nonlinear metrics) it is the node's
effect in random partial-patch contexts, closer to I(n) the smaller ``p``. Read theta as the
paper does: a diagnostic of what the verification could have missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .attribution import eval_mode
from .backends.baselines import check_subsampling, subsample
from .engine import Metric
from .engine.pairs import Pairs, make_pairs
from .metrics import check_metric
from .result import AttributionResult
from .verify import locate, verify


@dataclass
class FalseNegativeBound:
    """With probability ``confidence`` no node outside the verified top ``k`` has |effect| above
    ``theta``. ``estimates``: one row per unverified node (its subsampling ``estimate``,
    ``std_error``, ``df``, ``n_in``/``n_out`` subsets, and ``upper`` = |d| + q se, the smallest
    theta its own test rejects), largest ``upper`` first. ``verified``: ``verify(result, k)``
    (on ``metric``)."""

    theta: float
    confidence: float
    k: int
    n_subsets: int
    p: float
    estimates: pd.DataFrame
    verified: pd.DataFrame
    forward_passes: int  # spent on verification and the joint patches, as Engine counts them

    def p_value(self, theta: float) -> float:
        """max_n p_n(theta): bounds the probability that an unverified node has |I| >= theta."""
        return float(node_p_values(self.estimates, theta).max(initial=0.0))

    def __str__(self) -> str:
        setting = f"{len(self.estimates)} unverified nodes, {self.n_subsets} random joint patches, p={self.p}"
        if math.isfinite(self.theta):
            return (f"with {self.confidence:.0%} confidence no node outside the verified top {self.k} has |effect| "
                    f"above {self.theta:.4g} ({setting})")
        short = int((~np.isfinite(self.estimates["std_error"].to_numpy(dtype=float))).sum())
        return (f"no bound: {short} of the unverified nodes were in, or out of, fewer than 2 of the random subsets, "
                f"so their effect is not estimated ({setting}); raise n_subsets (or bring p nearer 0.5)")


def node_p_values(estimates: pd.DataFrame, theta: float) -> np.ndarray:
    """Per node, the TOST p-value of H0: |I| >= theta (module docstring): ``[nodes]``."""
    d, se, df = (estimates[c].to_numpy(dtype=float) for c in ("estimate", "std_error", "df"))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.maximum(stats.t.cdf((d - theta) / se, df), stats.t.sf((d + theta) / se, df))
    exact = se == 0  # no spread on either side: the estimate is taken as exact
    p[exact] = (np.abs(d[exact]) >= theta).astype(float)
    p[~np.isfinite(se)] = 1.0
    return p


def false_negative_bound(model: Any, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str],
                         metric: Metric, result: AttributionResult, *, k: int, n_subsets: int, p: float,
                         confidence: float = 0.95, seed: int = 0) -> FalseNegativeBound:
    """Verify the top ``k`` nodes of ``result`` and bound the effect of every other node.

    ``model``, ``clean``, ``corrupt``, ``metric``: those ``result`` was computed from (checked
    against the result's engine, which runs the patches). ``n_subsets`` random subsets of the
    unverified non-padding nodes, each node in a subset with probability ``p``, are patched
    jointly: ``n_subsets`` forward passes per pair. See the module docstring for the test.
    """
    result = _rebind(model, clean, corrupt, metric, result)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if k < 0:
        raise ValueError(f"k must be a non-negative number of nodes to verify, got {k}")
    check_subsampling(n_subsets, p)
    frame = result.to_frame()
    top = result.top(k) if k else frame.iloc[:0]
    rest = frame.drop(index=top.index)
    if rest.empty:
        raise ValueError(f"k={k} leaves no unverified node to bound; lower k")
    rest = rest.reset_index(drop=True)
    located = locate(result, rest)
    order = np.concatenate([rows for rows, _ in located.values()])  # node u of the subsets is row order[u]
    engine = result.require_engine("false_negative_bound()")
    with eval_mode(model, "false_negative_bound()"):
        verified = verify(result, k) if k else top.drop(columns=["score", "signed"])
        est = subsample(engine, {key: flat for key, (_, flat) in located.items()}, n_subsets=n_subsets, p=p,
                        seed=seed, desc="false-negative bound")
    out = rest.drop(columns=["signed"]).copy()
    for column, values in (("estimate", est.estimate), ("std_error", est.std_error), ("df", est.df),
                           ("n_in", est.n_in), ("n_out", est.n_out)):
        out.loc[order, column] = values.numpy()
    se, df = out["std_error"].to_numpy(), out["df"].to_numpy()
    with np.errstate(invalid="ignore"):
        q = np.where(se > 0, stats.t.ppf(confidence, df), 0.0)
    out["upper"] = np.where(np.isfinite(se), np.abs(out["estimate"].to_numpy()) + q * np.where(se > 0, se, 0), np.inf)
    out = out.sort_values("upper", ascending=False, kind="stable").reset_index(drop=True)
    return FalseNegativeBound(float(out["upper"].max()), confidence, k, n_subsets, p, out, verified,
                              engine.forward_passes)


def _rebind(model: Any, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str], metric: Metric,
            result: AttributionResult) -> AttributionResult:
    """``result`` with a fresh engine on ``metric`` (its own forward-pass count), after checking
    that ``model``, ``clean`` and ``corrupt`` are those the result was computed from."""
    if not isinstance(result, AttributionResult):
        raise TypeError(f"result must be the AttributionResult returned by attribute(), got {type(result).__name__}")
    old = result.require_engine("false_negative_bound()")
    if old.host.model is not model:
        raise ValueError("result was computed on a different model; pass the model given to attribute()")
    if not isinstance(old.pairs, Pairs):
        raise ValueError("false_negative_bound() takes the pairs as lists or tensors, and result was computed on a "
                         "PairStream; run attribute() and the bound on a list of the pairs (e.g. a sample of them)")
    pairs = make_pairs(old.host, clean, corrupt)
    if not all(torch.equal(getattr(pairs, f), getattr(old.pairs, f)) for f in ("clean", "corrupt", "mask")):
        raise ValueError("clean/corrupt differ from the prompts result was computed on; pass the same prompts")
    check_metric(metric, pairs, old.host.d_vocab)
    return replace(result, engine=old.with_metric(metric))

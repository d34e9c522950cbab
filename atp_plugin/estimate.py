"""``estimate()`` and ``estimate_edges()``: the peak memory and the passes ``attribute()`` (or
``attribute_edges()``) will need at a prompt length, before running it, and the largest batch of
pairs that fits a memory budget.

The estimate is measured, not modelled: it runs the method on a few short random prompts (three
lengths, batches of one pair and of two) while counting the tensor memory torch allocates and frees
(``engine.tensor_memory``), then extends the peak to ``n_tokens`` as a quadratic in the prompt
length (activations grow with T, attention patterns with T^2) that is linear in the batch size.
So it follows the model, host, node types and method as they are, the QK fix and GradDrop
included. It counts tensors only: the allocator's own overhead (a CUDA caching allocator's
reserve, a CPU heap's fragmentation) comes on top.
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from . import plugins
from .adapters import NodeAdapter, resolve
from .attribution import DEFAULT_BATCH, DEFAULT_NODES, attribute, check_hooks, check_length, host_for, positive_int
from .engine import distributed, memory
from .engine.estimates import BLOCKED_FROM
from .engine.tensor_memory import PeakTensorBytes

# prompt lengths of the probe runs (shorter prompts are probed as they are); from BLOCKED_FROM on,
# the QK fix runs the same ops at every length, so each op's bytes extend as a polynomial
PROBE_LENGTHS = (BLOCKED_FROM, 2 * BLOCKED_FROM, 3 * BLOCKED_FROM)


@dataclass(frozen=True)
class Estimate:
    """What ``attribute(model, ..., method=method, batch_size=batch_size)`` needs on pairs of
    ``n_tokens`` tokens: ``peak_bytes``, the most tensor memory alive at once above the loaded
    model (one batch's run, the scores included); ``forward_passes`` and ``backward_passes`` over
    ``n_pairs`` pairs, counted as in ``result.engine`` (prompts run forward; backward passes of
    one prompt, GradDrop's partial ones as fractions); ``budget``: the bytes the batch was sized
    against (``batch_size="auto"``), and ``fits``: whether ``peak_bytes`` is within it."""

    method: str
    n_tokens: int
    batch_size: int
    n_pairs: int
    peak_bytes: int
    forward_passes: float
    backward_passes: float
    budget: int | None = None

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak_bytes <= self.budget

    def __str__(self) -> str:
        within = "" if self.budget is None else \
            f" (budget {_size(self.budget)}{'' if self.fits else ', EXCEEDED'})"
        pairs = (f"one batch of {self.n_pairs} pair(s) of {self.n_tokens} tokens" if self.n_pairs == self.batch_size
                 else f"{self.n_pairs} pair(s) of {self.n_tokens} tokens in batches of {self.batch_size}")
        return (f"{self.method} on {pairs}: peak {_size(self.peak_bytes)} above the model"
                f"{within}; {self.forward_passes:g} forward and {self.backward_passes:g} backward passes of one prompt")


def _size(n_bytes: float) -> str:
    """Bytes in the largest binary unit of which there is at least one: 5.25 GiB, 312.50 MiB, 512 B."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n_bytes >= 1024 and power < len(units) - 1:
        n_bytes, power = n_bytes / 1024, power + 1
    return f"{n_bytes:.2f} {units[power]}" if power else f"{int(n_bytes)} B"


def estimate(model: Any, n_tokens: int, nodes: str | NodeAdapter | Sequence[str | NodeAdapter] = DEFAULT_NODES,
             method: str = "atp*", batch_size: int | Literal["auto"] = DEFAULT_BATCH, *, n_pairs: int | None = None,
             max_memory: float | None = None) -> Estimate:
    """Predict the peak memory and the passes of ``attribute()`` with these ``nodes`` and ``method``
    on pairs of ``n_tokens`` tokens, in batches of ``batch_size`` pairs, over ``n_pairs`` pairs
    (default: one batch). ``batch_size="auto"``: the largest batch whose peak fits ``max_memory``
    bytes (default: the budget exact patching uses, ``engine.memory.default_budget``), at least 1
    (check ``fits``). The probe runs take a few seconds on a GPT-2-small-sized model.

    Exact patching (``ap``, the baselines) runs one patched prompt per node and sizes its own
    batches from ``max_memory``; it is refused here. ``method`` is a registered backend's name.
    The probes use a metric of their own (two logits at the last position): a metric that builds
    large tensors of its own (e.g. a softmax over every position) adds memory not counted here.
    """
    backends = plugins.backends()
    if method not in backends:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(backends))}")
    if getattr(backends[method], "exhaustive", False):
        raise ValueError(f"estimate() covers the gradient methods; {method!r} patches every node exactly, with "
                         "patched prompts per pass sized from max_memory (attribute(..., max_memory=...))")
    adapters = resolve(nodes, plugins.adapters())
    host = host_for(model)
    check_hooks(host, adapters)
    return _predict(host, method, n_tokens, batch_size, n_pairs, max_memory, node_probe(model, adapters, method))


def node_probe(model: Any, adapters: list[NodeAdapter], method: str) -> Probe:
    """The probe ``estimate()`` profiles: ``attribute()`` with these node types and method."""
    def run(clean: torch.Tensor, corrupt: torch.Tensor, metric: Any, batch: int) -> tuple[float, float]:
        result = attribute(model, clean, corrupt, metric, nodes=adapters, method=method, batch_size=batch,
                           progress=False)
        engine = result.require_engine("estimate()")
        return engine.forward_passes, engine.backward_passes
    return run


def estimate_edges(model: Any, n_tokens: int, method: Any = "atp", batch_size: int | Literal["auto"] = DEFAULT_BATCH,
                   *, ig_steps: int | None = None, n_pairs: int | None = None,
                   max_memory: float | None = None) -> Estimate:
    """``estimate()`` for ``attribute_edges()`` with edge method ``method`` (``ig_steps`` as there):
    its peak memory and passes on pairs of ``n_tokens`` tokens, and ``batch_size="auto"``'s batch.
    Exact edge patching (``ap``) is refused: it patches copies, sized by ``patch_batch_size``."""
    from .edges.attribute import attribute_edges, resolve_method, structure
    from .engine.path import with_steps

    edge_method = with_steps(resolve_method(method), ig_steps)
    if getattr(edge_method, "exhaustive", False):
        raise ValueError(f"estimate_edges() covers the gradient methods; {edge_method.name!r} patches every edge "
                         "exactly, a batch of patch_batch_size copies at a time")
    host = host_for(model)
    structure(host)  # a host that cannot serve edges fails here, before any probe

    def run(clean: torch.Tensor, corrupt: torch.Tensor, metric: Any, batch: int) -> tuple[float, float]:
        result = attribute_edges(model, clean, corrupt, metric, method=edge_method, batch_size=batch, progress=False)
        return result.forward_passes, result.backward_passes

    return _predict(host, edge_method.name, n_tokens, batch_size, n_pairs, max_memory, run)


#: one probe: (clean, corrupt, metric, batch size) -> the (forward, backward) passes it ran
Probe = Callable[[torch.Tensor, torch.Tensor, Any, int], tuple[float, float]]


def _predict(host: Any, method: str, n_tokens: int, batch_size: int | Literal["auto"], n_pairs: int | None,
             max_memory: float | None, run: Probe) -> Estimate:
    """The estimate from probe runs of ``run`` (checked arguments first, then the probes)."""
    n_tokens = positive_int(n_tokens, "n_tokens", "it is the prompts' length in tokens (after padding)")
    if batch_size != "auto":
        batch_size = positive_int(batch_size, "batch_size", 'it is the number of pairs run at a time, or "auto"')
    budget = memory.check_max_memory(max_memory)
    check_length(host, n_tokens)
    if n_pairs is not None:
        n_pairs = positive_int(n_pairs, "n_pairs", "it is the number of pairs")
    # a second batch runs beside the sums the first left: probe two where there will be two
    batches = 2 if isinstance(batch_size, str) or (n_pairs or 0) > batch_size else 1
    prof = profile(run, host.d_vocab, PROBE_LENGTHS if n_tokens > PROBE_LENGTHS[-1] else (n_tokens,), batches)
    if isinstance(batch_size, str):
        budget = budget if budget is not None else memory.default_budget(host.device)
        batch_size = prof.largest_batch(n_tokens, budget, n_pairs)
    n = batch_size if n_pairs is None else n_pairs
    return Estimate(method, n_tokens, batch_size, n, int(prof.peak(n_tokens, min(batch_size, n))),
                    prof.passes[0] * n, prof.passes[1] * n, budget)


@dataclass(frozen=True)
class MemoryProfile:
    """The probe runs' traces (bytes alive after each op, per probe length, for batches of one
    pair and of two), from which the peak at any length and batch size follows without running
    again; ``passes``: (forward, backward) passes per pair."""

    lengths: tuple[int, ...]
    traces: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]
    passes: tuple[float, float]

    def peak(self, n_tokens: int, batch_size: int) -> float:
        """Peak tensor bytes above the model with batches of ``batch_size`` pairs of ``n_tokens``."""
        one, two = (_peak_at(list(t), self.lengths, n_tokens) for t in self.traces)
        return one + (batch_size - 1) * max(two - one, 0.0)

    def largest_batch(self, n_tokens: int, budget: float, n_pairs: int | None = None) -> int:
        """The largest batch whose peak is within ``budget`` bytes (at least 1; at most ``n_pairs``)."""
        one = self.peak(n_tokens, 1)
        per_pair = self.peak(n_tokens, 2) - one
        largest = int((budget - one) // per_pair) + 1 if per_pair > 0 else n_pairs or 1
        return max(1, min(largest, n_pairs or largest))


def profile(run: Probe, d_vocab: int, lengths: Sequence[int], batches: int = 2) -> MemoryProfile:
    """Trace ``run`` (``attribute()`` or ``attribute_edges()`` with one method) on random pairs of
    each of ``lengths`` tokens, in ``batches`` batches of one pair and of two (a second batch runs
    beside the sums the first left)."""
    _probe(run, lengths[0], 1, 1, d_vocab)  # one-time work (the host's probe of the model)
    traces: list[tuple[np.ndarray, ...]] = []
    passes = (0.0, 0.0)
    for b in (1, 2):
        runs = [_probe(run, t, b, batches, d_vocab) for t in lengths]
        traces.append(tuple(trace for trace, _ in runs))
        passes = runs[-1][1]
    return MemoryProfile(tuple(lengths), (traces[0], traces[1]), passes)


def _probe(run: Probe, n_tokens: int, batch: int, batches: int, d_vocab: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The bytes of tensors alive after each op of ``run`` on ``batches`` batches of ``batch``
    random pairs of ``n_tokens`` tokens, and its (forward, backward) passes per pair."""
    g = torch.Generator().manual_seed(n_tokens * 7 + batch)
    clean = torch.randint(0, d_vocab, (batches * batch, n_tokens), generator=g)
    corrupt = torch.randint(0, d_vocab, (batches * batch, n_tokens), generator=g)

    def metric(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0] - logits[:, -1, min(1, d_vocab - 1)]

    gc.collect()  # garbage of earlier runs is not freed in the middle of this one
    with warnings.catch_warnings(), distributed.alone(), PeakTensorBytes(trace=True) as counted:
        warnings.simplefilter("ignore")  # the user's own run will warn (e.g. GradDrop with few layers)
        forward, backward = run(clean, corrupt, metric, batch)
    assert counted.trace is not None
    n = batches * batch
    return np.array(counted.trace), (forward / n, backward / n)


def _peak_at(traces: list[np.ndarray], lengths: Sequence[int], n_tokens: int) -> float:
    """The peak at ``n_tokens`` from the probes' traces at ``lengths`` (one batch size). Every op's
    bytes are a polynomial in the length (activations grow with T, attention patterns with T^2), so
    the polynomial through the probes gives each op's bytes at any length, and their maximum is the
    peak there whichever op holds it. Where the probes ran different ops (a length-dependent code
    path), their peaks are extended instead."""
    if len({len(t) for t in traces}) > 1:
        traces = [np.array([t.max()]) for t in traces]
    x = np.stack(traces).astype(float)  # [length, op]
    weights = np.array([math.prod((n_tokens - o) / (t - o) for o in lengths if o != t) for t in lengths])
    at_n = np.maximum(weights @ x, x.max(0))  # Lagrange at n_tokens; never below what a shorter probe held
    return float(at_n.max())

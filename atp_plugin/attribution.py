"""``attribute()``: the one entry point that ranks nodes of a model for a behaviour."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from . import plugins
from .adapters import NodeAdapter, resolve
from .backends import Backend
from .engine import Engine, Metric
from .engine.pairs import make_pairs
from .result import AttributionResult

DEFAULT_NODES = ("attn_z", "mlp_neurons")
DEFAULT_BATCH = 16


def host_for(model: Any):
    """The registered host that accepts ``model`` (a clear error listing them otherwise)."""
    hosts = plugins.hosts()
    for host_cls in hosts.values():
        if host_cls.accepts(model):
            return host_cls(model)
    raise TypeError(f"unsupported model type {type(model).__name__}; supported hosts: {', '.join(hosts)} "
                    "(register another through the atp_register_hosts hook)")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run in eval mode: dropout would make every estimate and patch noisy."""
    training = bool(getattr(model, "training", False))
    if training:
        warnings.warn("the model is in training mode; dropout breaks the estimates, so attribute() runs it in "
                      "eval mode (call model.eval() to silence this)", stacklevel=4)
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


def attribute(model: Any, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str],
              metric: Metric, *, nodes: str | NodeAdapter | Sequence[str | NodeAdapter] = DEFAULT_NODES,
              method: "str | Backend" = "atp*", batch_size: int | None = None, patch_batch_size: int = 64,
              progress: bool | None = None) -> AttributionResult:
    """Score every node of the requested types by how much patching it from ``corrupt`` into
    ``clean`` changes ``metric``.

    ``clean``/``corrupt``: token tensors ``[N, T]`` or lists of N strings (pairs token-aligned;
    pairs of different lengths are left-padded). ``metric(logits, indices) -> [batch]`` (or
    ``metric(logits)``). ``nodes``: node type names or adapter instances. ``method``: a registered
    backend's name (``atp*`` by default) or a backend instance (e.g. a configured
    ``Subsampling(n_subsets=64)``). ``batch_size`` pairs are processed at a time.
    """
    backends = plugins.backends()
    if isinstance(method, str):
        if method not in backends:
            raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(backends))}")
        backend = backends[method]
    elif isinstance(getattr(method, "name", None), str) and callable(getattr(method, "run", None)):
        backend, method = method, method.name
    else:
        raise TypeError(f"method must be a backend name ({', '.join(sorted(backends))}) or an object with "
                        f"`name` and `run(engine)`, got {method!r}")
    adapters = resolve(nodes, plugins.adapters())
    host = host_for(model)
    missing = sorted({h for a in adapters for h in a.hooks(host) if not host.has_hook(h)})
    if missing:
        raise ValueError(f"the model lacks hook(s) {missing[:5]} needed by nodes={[a.name for a in adapters]}; "
                         "choose node types this model has")
    pairs = make_pairs(host, clean, corrupt)
    n_metric = getattr(metric, "n_pairs", None)
    if n_metric is not None and n_metric != pairs.n:
        raise ValueError(f"the metric holds answers for {n_metric} pairs but {pairs.n} pairs were given")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of pairs, got {batch_size}")
    engine = Engine(host, pairs, metric, adapters, batch_size=batch_size or DEFAULT_BATCH,
                    patch_batch_size=patch_batch_size, progress=progress)
    if getattr(backend, "qk", False):
        for s in engine.sites(qk=True):
            if s.qk_fixed:
                host.attention(s.pos.layer)  # unsupported attention variants fail here, before any run
    with eval_mode(model):
        scores, signed = backend.run(engine)
    dims = {key: adapter.groups(host)[grp] for key, (adapter, grp) in engine.keys().items()}
    pad = ~pairs.mask.any(0)
    return AttributionResult(method, scores, signed, dims, pad.cpu(), pairs.alignment, pairs.n, engine=engine)

"""``attribute()``: the one entry point that ranks nodes of a model for a behaviour."""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

import torch

from . import plugins
from .adapters import NodeAdapter, resolve
from .backends import Backend
from .engine import Engine, Metric, distributed
from .engine.memory import check_max_memory
from .engine.pairs import PairSource, make_pairs
from .engine.path import with_steps
from .engine.stream import BoundStream, PairStream
from .errors import AtpError, UnsupportedModelError
from .hosts import Host
from .metrics import check_metric
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
def eval_mode(model: Any, caller: str = "attribute()") -> Iterator[None]:
    """Run in eval mode: dropout would make every estimate and patch noisy. ``caller`` names the
    function in the warning. Each submodule gets its own mode back afterwards (``model.train()``
    would also switch submodules the user had put in eval mode)."""
    training = bool(getattr(model, "training", False))
    modes = {m: m.training for m in model.modules()} if training and hasattr(model, "modules") else {}
    if training:
        warnings.warn(f"the model is in training mode; dropout breaks the estimates, so {caller} runs it in "
                      "eval mode (call model.eval() to silence this)", stacklevel=4)
        model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def positive_int(value: Any, name: str, fix: str) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError/TypeError saying ``fix``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__}); {fix}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}; {fix}")
    return int(value)


def check_length(host: Host, n_tokens: int) -> None:
    """Fail before any run when prompts are longer than the model's context ``host.n_ctx`` (its
    positional embeddings and causal mask stop there)."""
    n_ctx = host.n_ctx
    if n_ctx is not None and n_tokens > n_ctx:
        raise AtpError(f"the prompts are {n_tokens} tokens long (after padding to the longest) but the model's "
                         f"context length n_ctx is {n_ctx}; shorten the prompts to at most {n_ctx} tokens")


def check_hooks(host: Host, adapters: list[NodeAdapter]) -> None:
    """Fail before any run where the model lacks a hook the node types read."""
    missing = sorted({h for a in adapters for h in a.hooks(host) if not host.has_hook(h)})
    if missing:
        raise UnsupportedModelError(f"the model lacks hook(s) {missing[:5]} needed by "
                                    f"nodes={[a.name for a in adapters]}; choose node types this model has")


def make_source(host: Host, clean: torch.Tensor | Sequence[str] | PairStream,
                corrupt: torch.Tensor | Sequence[str] | None) -> PairSource:
    """The pairs as the engine reads them: in memory, or a ``PairStream`` bound to the model."""
    if isinstance(clean, PairStream):
        if corrupt is not None:
            raise TypeError("a PairStream holds both prompts of each pair: give no corrupt prompts beside it")
        return BoundStream(host, clean)
    if corrupt is None:
        raise TypeError("give the corrupt prompts (one per clean prompt), or the pairs as a PairStream")
    return make_pairs(host, clean, corrupt)


def attribute(model: Any, clean: torch.Tensor | Sequence[str] | PairStream,
              corrupt: torch.Tensor | Sequence[str] | None = None, metric: Metric | None = None, *,
              nodes: str | NodeAdapter | Sequence[str | NodeAdapter] = DEFAULT_NODES,
              method: "str | Backend" = "atp*", ig_steps: int | None = None,
              batch_size: int | Literal["auto"] | None = None,
              patch_batch_size: int | None = None,
              max_memory: float | None = None, progress: bool | None = None) -> AttributionResult:
    """Score every node of the requested types by how much patching it from ``corrupt`` into
    ``clean`` changes ``metric``.

    ``clean``/``corrupt``: token tensors ``[N, T]`` or lists of N strings (pairs token-aligned;
    pairs of different lengths are left-padded); or ``clean`` a ``PairStream`` (pairs read and
    tokenized a batch at a time, memory flat in their number) and no ``corrupt``.
    ``metric(logits, indices) -> [batch]`` (or ``metric(logits)``; on a labelled stream
    ``metric(logits, labels)``). ``nodes``: node type names or adapter instances. ``method``: a registered
    backend's name (``atp*`` by default) or a backend instance (e.g. a configured
    ``Subsampling(n_subsets=64)``). ``ig_steps``: gradient points of an IG method (``"ig"``: 10 by
    default; methods without steps ignore it), as ``attribute_edges()`` takes them. ``batch_size``
    pairs are processed at a time (16 by default); ``"auto"``: the largest batch whose peak fits
    ``max_memory`` by ``estimate()`` (a few seconds of probe runs; the gradient methods only).

    Exact patching (``ap``, ``verify``, the baselines, the bound) runs many patched copies of the
    prompts per forward pass: ``patch_batch_size`` copies, or by default as many as fit in
    ``max_memory`` bytes by an estimate of a forward pass's peak at this prompt length
    (``engine.memory``); without ``max_memory``, half the free memory of a CUDA device or a
    quarter of the available memory on the CPU. ``progress``: False for no progress output, True
    for progress bars also on short runs; by default bars on a terminal, and for exhaustive work
    of more than a few hundred patched prompts a first line with its size and time estimate and
    a progress line every few seconds also where stderr is not a terminal.
    """
    if torch.is_inference_mode_enabled():
        raise AtpError("attribute() was called under torch.inference_mode(), where no gradient can be taken; "
                       "call it outside the inference_mode block (it switches gradients on only where it needs them)")
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
    backend = with_steps(backend, ig_steps)
    if metric is None:
        raise TypeError("attribute() needs a metric: attribute(model, clean, corrupt, metric) or "
                        "attribute(model, PairStream(...), metric=metric)")
    if batch_size is not None and batch_size != "auto":
        batch_size = positive_int(batch_size, "batch_size", 'it is the number of pairs run at a time, or "auto"')
    if patch_batch_size is not None:
        patch_batch_size = positive_int(patch_batch_size, "patch_batch_size",
                                        "it is the number of patched prompts run at a time")
        if max_memory is not None:
            raise ValueError("give patch_batch_size (patched prompts per forward pass) or max_memory (bytes they "
                             "may use), not both")
    max_memory = check_max_memory(max_memory)
    adapters = resolve(nodes, plugins.adapters())
    host = host_for(model)
    check_hooks(host, adapters)
    pairs = make_source(host, clean, corrupt)
    check_length(host, pairs.width)
    check_metric(metric, pairs, host.d_vocab)
    if batch_size == "auto":
        from .estimate import estimate  # estimate() probes through attribute()
        batch_size = distributed.all_min(estimate(model, pairs.width, adapters, method, "auto", n_pairs=pairs.n,
                                                  max_memory=max_memory).batch_size, host.device)  # one for all ranks
    engine = Engine(host, pairs, metric, adapters, batch_size=batch_size or DEFAULT_BATCH,
                    patch_batch_size=patch_batch_size, max_memory=max_memory, progress=progress)
    with eval_mode(model):
        scores, signed, *std_error = backend.run(engine)  # a third dict: standard errors over pairs
    dims = {key: adapter.groups(host)[grp] for key, (adapter, grp) in engine.keys().items()}
    return AttributionResult(method, scores, signed, dims, pairs.counts.cpu(), pairs.alignment, pairs.n,
                             engine=engine, std_error=std_error[0] if std_error else None)

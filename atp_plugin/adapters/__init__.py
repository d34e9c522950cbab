"""Node adapters: each maps the activation at one or more hook sites onto a space of nodes.

The engine hands an adapter site values and gradients; the adapter says what its nodes are.
Built-ins (``attn_q``, ``attn_k``, ``attn_v``, ``attn_z``, ``mlp_neurons``, ``resid_pre``) slice
the site; ``SAEFeatures`` encodes it; ``TranscoderFeatures`` encodes an earlier hook and writes
the site. Write your own by following ``NodeAdapter``.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch

from ..hosts import Host


@runtime_checkable
class NodeAdapter(Protocol):
    """The contract a node type follows.

    A node is one entry of ``encode(site_value)[group]`` at one position; nodes in the same
    ``group`` form one score tensor, keyed ``name + group`` in the result (the main group is
    ``""``). Every tensor below is ``[batch, pos, *node_dims, feat]``: ``feat`` is the vector a
    node's dot product runs over (1 for scalar nodes).

    Optional: ``reads(hook) -> tuple[str, ...]``, hooks besides ``hook`` whose values the nodes
    are computed from (a transcoder's input hook). They must run before ``hook``; they are read,
    never patched, and get no gradient: the nodes' effect on the model passes through ``hook``
    alone. Where ``reads(hook)`` is not empty the adapter gets, wherever a site value is passed
    below (``act``, ``clean``, ``noise``), a dict hook name -> value holding ``hook`` and every hook
    it reads (in a patched run, their current values); ``grad`` stays dL/d(``hook``) and ``patch``
    still returns the new value of ``hook``.
    """

    # Read-only members, so that frozen dataclasses (and plain attributes) satisfy the protocol.
    @property
    def name(self) -> str:
        """The node type's name; score keys are ``name + group``."""

    @property
    def qk(self) -> Literal["q", "k"] | None:
        """``"q"`` or ``"k"`` when the nodes are a layer's queries or keys (the QK fix applies), else None."""

    def hooks(self, host: Host) -> list[str]:
        """Hook names this adapter reads, in score order (one per layer for layered adapters)."""

    def groups(self, host: Host) -> dict[str, tuple[str, ...]]:
        """Group suffix -> names of the score dimensions, e.g. ``{"": ("layer", "pos", "head")}``.

        A leading ``"layer"`` dimension means one slice per hook; otherwise the adapter has one hook.
        """

    # ``act``, ``clean`` and ``noise`` are site values: a tensor, or for an adapter with ``reads``
    # a dict hook name -> tensor (see above). Typed Any so that an adapter declares the one it takes.
    def encode(self, hook: str, act: Any) -> dict[str, torch.Tensor]:
        """Node values of a site value: group -> ``[batch, pos, *node_dims, feat]``."""

    def pullback(self, hook: str, act: Any, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """dL/d(node values) given dL/d(site value) at site value ``act``; same shapes as encode."""

    def patch(self, hook: str, clean: Any, noise: Any, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """The site value with the nodes selected by ``masks`` (group -> bool ``[batch, pos,
        *node_dims]``) set to their values in ``noise`` and every other node left as in ``clean``."""


def __getattr__(name: str):
    """``SAEFeatures`` and ``TranscoderFeatures`` are imported on first use: they need SAE-Lens,
    which is slow to import."""
    if name == "SAEFeatures":
        from .sae import SAEFeatures
        return SAEFeatures
    if name == "TranscoderFeatures":
        from .transcoder import TranscoderFeatures
        return TranscoderFeatures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wrapper_for(item: object) -> str | None:
    """The adapter that turns an SAE-Lens object into nodes (a transcoder or an SAE), if ``item`` is one."""
    if not type(item).__module__.startswith("sae_lens"):
        return None
    from sae_lens import SAE, Transcoder
    if isinstance(item, Transcoder):
        return "TranscoderFeatures"
    return "SAEFeatures" if isinstance(item, SAE) else None


def resolve(nodes: "str | NodeAdapter | Sequence[str | NodeAdapter]",
            known: dict[str, NodeAdapter]) -> list[NodeAdapter]:
    """Turn ``nodes=`` (names and/or adapter instances) into adapters, with a clear error."""
    if isinstance(nodes, (str, NodeAdapter)):
        items = [nodes]
    elif nodes is None or not hasattr(nodes, "__iter__"):
        raise TypeError(f"nodes= must be a node type name, a NodeAdapter or a list of them, got {nodes!r}; "
                        f"choose from {sorted(known)} (leave nodes= out for the default)")
    else:
        items = list(nodes)
    if not items:
        raise ValueError(f"nodes= is empty; choose from {sorted(known)} or pass NodeAdapter instances")
    out: list[NodeAdapter] = []
    for item in items:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(f"unknown node type {item!r}; known node types: {', '.join(sorted(known))}")
            out.append(known[item])
        elif isinstance(item, NodeAdapter):
            out.append(item)
        else:
            wrap = _wrapper_for(item)
            hint = f"; wrap it: nodes=[{wrap}(...)] from atp_plugin.adapters" if wrap else ""
            raise TypeError(f"nodes= entries must be node type names or NodeAdapter instances, got a "
                            f"{type(item).__module__}.{type(item).__name__}{hint}")
    names = [a.name for a in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"node type(s) {dupes} requested twice; give each adapter a distinct name")
    return out

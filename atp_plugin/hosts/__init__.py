"""Model hosts: what the engine needs from a model, behind one small interface.

A host runs the model with TransformerLens-style hooks, tokenizes, and describes where each hook
sits relative to the residual stream (for GradDrop) and how attention scores are formed (for the
QK fix). Edges need more: a host that can answer them offers ``structure()`` (``hosts.structure``),
an optional capability. ``TransformerBridge`` and, under TransformerLens 3, ``HookedTransformer`` are built in;
others register through ``atp_register_hosts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

Hook = Callable[[torch.Tensor, Any], torch.Tensor | None]


@dataclass(frozen=True)
class SitePosition:
    """Where a hook sits: inside layer ``layer``'s write (its attention or MLP), or on the
    residual stream feeding layer ``layer`` (``on_resid``; ``layer == n_layers`` after the last)."""

    layer: int
    on_resid: bool


@dataclass(frozen=True)
class Rotation:
    """How a layer turns the values at its ``q_hook``/``k_hook`` into the vectors it dots, where no
    hook holds those (a TransformerBridge whose attention rotates inside, e.g. GPT-NeoX, Phi-3).

    ``apply(x, values)`` takes q or k vectors ``[..., batch, pos, heads, d_head]`` (any leading
    axes, e.g. senders) and the values of one run at ``reads`` (e.g. the cos and sin the model
    used), and returns them rotated as the model rotates them. It is linear in ``x``.
    """

    reads: tuple[str, ...]
    apply: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AttentionGeometry:
    """How one layer turns queries and keys into scores, as the QK fix needs it.

    ``q_hook``/``k_hook`` hold the vectors actually dotted (after rotary where the model has it),
    or, with a ``rotation``, the vectors it rotates into those (``dotted``);
    score = softcap(q . k / scale), plus a bias named in ``score_bias`` where the model adds one
    (ALiBi: the QK fix, nodes and edges alike, recomputes scores from q and k and refuses such a
    layer); masked entries are -inf in ``scores_hook``; kv-head j feeds
    query heads j*group .. (j+1)*group-1. Each head's output at ``z_hook`` is its pattern times the
    values at ``v_hook`` (z_t = sum_s A_ts v_s) and the pattern feeds nothing else, so dL/dA =
    dL/dz v^T: GradDrop keeps each layer's query fix as its product with v instead of a
    ``[batch, head, t, s]`` tensor.
    """

    q_hook: str
    k_hook: str
    scores_hook: str
    pattern_hook: str
    v_hook: str
    z_hook: str
    scale: float
    softcap: float | None
    group: int
    score_bias: str | None = None
    rotation: Rotation | None = None

    @property
    def reads(self) -> tuple[str, ...]:
        """The hooks whose values (of one run) give the vectors dotted: q, k and the rotation's."""
        return (self.q_hook, self.k_hook) + (self.rotation.reads if self.rotation is not None else ())

    def dotted(self, which: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The queries (``which="q"``) or keys (``"k"``) the layer dots, ``[batch, pos, (kv-)heads,
        d_head]``, from one run's ``values`` at ``reads``."""
        x = values[self.q_hook if which == "q" else self.k_hook]
        return x if self.rotation is None else self.rotation.apply(x, values)


def rounding(dtype: torch.dtype) -> float:
    """The relative mismatch a check that recomputes what a model computed in ``dtype`` allows: its
    own rounding (half-precision scores miss a float32 fit by 3e-4 (float16) to 5e-3 (bfloat16))."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


class Host(Protocol):
    """What the engine asks of a model."""

    name: str
    model: Any
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_vocab: int  # token ids are checked against it before any run
    n_ctx: int | None  # the longest prompt the model takes (None: no limit); checked before any run
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def accepts(cls, model: Any) -> bool: ...

    def has_hook(self, name: str) -> bool: ...

    def act_shape(self, hook: str) -> tuple[int, ...] | None:
        """The trailing shape of ``hook``'s value after ``[batch, pos]`` (None where unknown before a run)."""

    def tokenize(self, text: str) -> list[int]: ...

    def pad_id(self) -> int: ...

    def run(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            hooks: list[tuple[str, Hook]]) -> torch.Tensor: ...

    def site_position(self, hook: str) -> SitePosition: ...

    def resid_hooks(self, layer: int) -> tuple[str, str]: ...

    def attention(self, layer: int) -> AttentionGeometry: ...

    # optional, for edges: ``structure() -> hosts.structure.Structure`` (weights, norms and MLPs as
    # the edge engine recomputes them); a host without it serves node methods only

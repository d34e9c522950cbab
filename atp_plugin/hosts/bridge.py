"""The built-in host for TransformerLens's ``TransformerBridge`` (3.x and 4.x) in compatibility mode.

The bridge wraps a Hugging Face model and exposes TransformerLens-style hook names
(``blocks.0.attn.hook_z``, ``blocks.0.hook_resid_pre``, ...). Three things differ from a
``HookedTransformer`` and are handled here:

* Some bridge hook points reshape the activation before the hook sees it and use the hook's
  *return value* downstream; a hook point the wrapped model computes around (fires on a copy, or
  under ``no_grad``) would make gradients vanish and patches do nothing, silently. Before a hook
  is used for the first time the host checks, with one tiny forward and backward pass, that the
  tensor its hook returns reaches the logits; a hook that does not is an error.
* With left padding the bridge's backward pass turns fully masked (padding) query rows into NaN
  gradients that spread to every earlier activation; the host zeroes them where they arise.
* The attention scale differs between architectures (GPT-2 may scale by the inverse layer index,
  Gemma uses ``query_pre_attn_scalar``...). The QK fix needs it exactly, so the host measures it
  on a probe prompt (scores = softcap(q . k / scale)) and refuses layers where no single scale
  reproduces the scores (ALiBi and other score biases).

Speed. The probes above cost a forward (and backward) pass each, so their results are kept per
model between ``attribute()`` calls (``_PROBES``, keyed weakly by the model) together with each hook
name's hook point, and reused while ``model_state`` (the model's module tree, the hooks on it, its
parameters' dtypes and devices, its config, compatibility mode) is unchanged; anything else is
learned again. The scales of all layers are measured in one probe run. The hooks of a run reach
``run_with_hooks`` as one name filter with one dispatching hook instead of one entry per name:
under TransformerLens 3 each named entry rebuilds the bridge's ``hook_dict`` with all its aliases
(about 1.6 ms on a 6-layer GPT-2, 50-100 ms an ``attribute()`` call).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError
from ..hookspecs import hookimpl
from . import AttentionGeometry, Hook, Rotation, rounding
from .tl import TransformerLensHost


@dataclass
class Probes:
    """What the host has learned about one model by looking at and running it; valid while the
    model's ``model_state`` is ``state``. Holds no reference to the model, so keeping it does not
    keep the model alive."""

    state: Hashable
    canonical: dict[str, str]  # every hook name the bridge knows (aliases included) -> its hook point's name
    checked: set[str] = field(default_factory=set)  # hook names whose returned value reaches the logits
    # layer -> measured geometry, or why the QK fix cannot serve the layer
    geometry: dict[int, AttentionGeometry | str] = field(default_factory=dict)


#: per model, its probes from earlier calls (dropped with the model)
_PROBES: weakref.WeakKeyDictionary[Any, Probes] = weakref.WeakKeyDictionary()


def model_state(model: Any) -> Hashable:
    """Everything the probes depend on that can change after the bridge is built: compatibility
    mode; the config (``repr`` of its fields: dtype, device, the ``set_use_*`` hook gates,
    grouped-query ungrouping...); the dtype and device of every parameter and buffer
    (``model.to(...)``); and the module tree with the forward hooks and pre-hooks registered on
    each module (a module swapped in or out, or a hook that detaches or replaces a value, changes
    which hooks feed the logits and how scores are formed). Weight values are not in it: the
    probes test structure, not values. About 0.6 ms on a 6-layer GPT-2."""
    cfg = repr(sorted(vars(model.cfg).items(), key=lambda item: item[0]))
    tensors = frozenset((t.dtype, t.device) for t in itertools.chain(model.parameters(), model.buffers()))
    modules = tuple((id(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in model.modules())
    return bool(model.compatibility_mode), cfg, tensors, modules


def probes_for(model: Any) -> Probes:
    """The model's probes from earlier calls if its state has not changed since, else new ones
    (hook names resolved afresh, nothing checked or measured yet)."""
    state = model_state(model)
    probes = _PROBES.get(model)
    if probes is None or probes.state != state:
        canonical = {name: point.name or name for name, point in model.hook_dict.items()}
        probes = _PROBES[model] = Probes(state, canonical)
    return probes


class TransformerBridgeHost(TransformerLensHost):
    """Runs a ``TransformerBridge`` (compatibility mode) with forward hooks.

    Hook naming, where hooks sit relative to the residual stream, tokenization and padding are
    those of ``HookedTransformer`` (compatibility mode gives the same names and numerics).
    """

    name = "TransformerBridge"

    def __init__(self, model: Any):
        if not getattr(model, "compatibility_mode", False):
            raise UnsupportedModelError("this TransformerBridge is not in compatibility mode: call "
                             "model.enable_compatibility_mode() first (atp-plugin relies on its "
                             "TransformerLens hook names and HookedTransformer numerics)")
        super().__init__(model)
        self._probes = probes_for(model)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        bridge = sys.modules.get("transformer_lens.model_bridge")  # loaded wherever a Bridge exists
        return bridge is not None and isinstance(model, bridge.TransformerBridge)

    def run(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            hooks: list[tuple[str, Hook]]) -> torch.Tensor:
        self._check_hooks([name for name, _ in hooks])
        if attention_mask is not None and torch.is_grad_enabled() and not bool(attention_mask.all()):
            hooks = hooks + [(f"blocks.{layer}.attn.hook_attn_scores", _zero_grad_of_masked_rows)
                             for layer in range(self.n_layers)]
        return self.model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=self._dispatched(hooks))

    def has_hook(self, name: str) -> bool:
        return name in self._probes.canonical

    def _dispatched(self, hooks: list[tuple[str, Hook]]) -> list[tuple[Callable[[str], bool], Hook]]:
        """``hooks`` as one ``run_with_hooks`` entry: a filter matching their hook points' names and
        a hook that calls, at each point, that point's hooks in order, each on what the previous
        returned (as separate entries would). The bridge resolves a filter against one ``hook_dict``
        per run instead of one per named entry."""
        by_point: dict[str, list[Hook]] = {}
        for name, hook in hooks:
            by_point.setdefault(self._probes.canonical.get(name, name), []).append(hook)

        def dispatch(x: torch.Tensor, hook: Any = None) -> torch.Tensor | None:
            out = None
            for fn in by_point[hook.name]:
                result = fn(x if out is None else out, hook)
                if result is not None:
                    out = result
            return out

        return [(by_point.__contains__, dispatch)] if by_point else []

    def _check_hooks(self, names: list[str]) -> None:
        """Check that what a hook at each of ``names`` returns is what the model uses downstream:
        add a zero leaf to every hook's output and require a gradient at each (raises otherwise)."""
        new = sorted(set(names) - self._probes.checked)
        if not new:
            return
        leaves: dict[str, torch.Tensor] = {}

        def add_leaf(name: str) -> Hook:
            def hook(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
                if not x.is_floating_point():
                    return x  # token ids: not a site anything can be attributed to
                leaves[name] = torch.zeros_like(x, requires_grad=True)
                return x + leaves[name]
            return hook

        with torch.enable_grad():
            logits = self._probe_run([(n, add_leaf(n)) for n in new])
            fired = [n for n in new if n in leaves]
            grads = torch.autograd.grad(logits.sum(), [leaves[n] for n in fired], allow_unused=True) if fired else ()
        reached = {n for n, g in zip(fired, grads) if g is not None}
        dead = [n for n in new if n not in reached]
        if dead:
            raise UnsupportedModelError(
                f"hook point(s) {dead} of this TransformerBridge ({self.cfg.architecture}) do not feed the model's "
                "output: what a hook there returns never reaches the logits (the hook point does not fire, the bridge "
                "ignores its return value, or a hook or no_grad block detaches it), so gradients would vanish and "
                "patches would do nothing. Choose other node types (nodes=) or remove the detaching hook.")
        self._probes.checked.update(new)

    def _probe_run(self, hooks: list[tuple[Any, Hook]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        logits = super()._probe_run(hooks, tokens)
        # the bridge wires hooks of its own into each block on the block's first forward (a fresh
        # model's first run is a probe): the state the probes hold is the state after it
        self._probes.state = model_state(self.model)
        return logits

    def attention(self, layer: int) -> AttentionGeometry:
        geometry = self._probes.geometry
        if layer not in geometry:  # every layer at once: one probe run instead of one a layer
            geometry.update(self._measure_attention([n for n in range(self.n_layers) if n not in geometry]))
        found = geometry[layer]
        if isinstance(found, str):
            raise UnsupportedModelError(found)
        return found

    def _measure_attention(self, layers: list[int]) -> dict[int, AttentionGeometry | str]:
        """Each layer's geometry, its scale measured on the probe prompt and checked to reproduce
        the scores the bridge computes (to float rounding), or why the QK fix cannot serve it."""
        found: dict[int, AttentionGeometry | str] = {}
        guesses: dict[int, AttentionGeometry] = {}
        for layer in layers:
            post = "rot_" if self.has_hook(f"blocks.{layer}.attn.hook_rot_q") else ""
            geom = self.geometry(layer, scale=1.0, post=post)
            missing = [h for h in _read(geom) if not self.has_hook(h)]
            if missing:
                found[layer] = (f"the QK fix needs hook(s) {missing}, which this TransformerBridge lacks; "
                                "use method='atp' or 'atp+gd' for attn_q/attn_k nodes")
            else:
                guesses[layer] = geom
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Hook:
            def hook(x: torch.Tensor, hook: Any = None) -> None:
                acts[name] = x.detach()
            return hook

        rotated = {layer: self._rotated(layer) for layer, geom in guesses.items() if geom.q_hook.endswith("rot_q")}
        names = [h for geom in [*guesses.values(), *filter(None, rotated.values())] for h in _read(geom)]
        if names:
            with torch.no_grad():
                self._probe_run(self._dispatched([(h, keep(h)) for h in dict.fromkeys(names)]))
        for layer, geom in guesses.items():
            silent = [h for h in _read(geom) if h not in acts]
            alt = rotated.get(layer)
            if silent and alt is not None and all(h in acts for h in _read(alt)):
                geom, silent = alt, []  # no hook holds the rotated q and k: the host rotates them
            if silent:
                found[layer] = (f"the QK fix reads hook(s) {silent}, which do not fire in this TransformerBridge "
                                f"({self.cfg.architecture}); use method='atp' or 'atp+gd' for attn_q/attn_k nodes")
                continue
            found[layer] = self._fit_scale(layer, geom, acts)
        fitted = {layer: geom for layer, geom in found.items() if isinstance(geom, AttentionGeometry)}
        found.update(self._check_patched_patterns(fitted))
        return found

    def rotation(self, layer: int) -> Rotation | None:
        """How the layer rotates q and k (``_rotated``), for edges that rotate changed q/k vectors
        themselves (the edge QK fix); None where the host cannot rotate them."""
        geom = self._rotated(layer)
        return None if geom is None else geom.rotation

    def _rotated(self, layer: int) -> AttentionGeometry | None:
        """Layer ``layer``'s geometry (scale 1) for an attention that rotates q and k inside, without
        firing ``hook_rot_q``/``hook_rot_k`` (the Bridge's fused-qkv rotary attention: GPT-NeoX,
        Phi-3): the host rotates the values at ``hook_q``/``hook_k`` itself with the cos and sin the
        model used (``hook_cos``/``hook_sin``), as Hugging Face's ``apply_rotary_pos_emb`` does, on
        the leading dimensions cos covers (partial rotary). None where those hooks are missing or
        the model pairs rotary dimensions otherwise; ``_check_patched_patterns`` checks the rest."""
        cos, sin = f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"
        if not (self.has_hook(cos) and self.has_hook(sin)) or any(
                getattr(self.cfg, flag, False) for flag in ("rotary_adjacent_pairs", "rotary_interleaved_cos_sin")):
            return None
        geom = self.geometry(layer, scale=1.0, post="")
        return dataclasses.replace(geom, rotation=Rotation((cos, sin), lambda x, values: rotate_half_rotary(
            x, values[cos], values[sin])))

    def _fit_scale(self, layer: int, geom: AttentionGeometry, acts: dict[str, torch.Tensor]
                   ) -> AttentionGeometry | str:
        """Layer ``layer``'s ``geom`` with the least-squares scale of the probe run's values
        ``acts``, or why no single scale reproduces its scores."""
        q, k = geom.dotted("q", acts).double(), geom.dotted("k", acts).double().repeat_interleave(geom.group, dim=2)
        raw = torch.einsum("bthd,bshd->bhts", q, k)  # q . k, [batch, head, t, s]
        scores = acts[geom.scores_hook].double()
        live = torch.isfinite(scores)
        target = scores[live]
        if geom.softcap is not None:
            target = geom.softcap * torch.atanh((target / geom.softcap).clamp(-1 + 1e-12, 1 - 1e-12))
        inv = float((raw[live] * target).sum() / (raw[live] ** 2).sum())  # least squares 1/scale
        geom = dataclasses.replace(geom, scale=1.0 / inv)
        rebuilt = raw * inv
        if geom.softcap is not None:
            rebuilt = geom.softcap * torch.tanh(rebuilt / geom.softcap)
        err = float((rebuilt[live] - scores[live]).abs().max()) / max(float(scores[live].abs().max()), 1e-30)
        if not err <= rounding(self.dtype):
            return (f"layer {layer} of this TransformerBridge ({self.cfg.architecture}) forms attention scores that "
                    f"are not softcap(q . k / scale) (relative mismatch {err:.2g}; e.g. ALiBi or another score bias), "
                    "so the QK fix cannot recompute them; use method='atp' or 'atp+gd' for attn_q/attn_k nodes")
        return geom


def _read(geom: AttentionGeometry) -> tuple[str, ...]:
    """The hooks the QK fix reads in a layer of geometry ``geom``."""
    return *geom.reads, geom.scores_hook, geom.pattern_hook, geom.v_hook, geom.z_hook


def rotate_half_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding (``apply_rotary_pos_emb``, halves rotated) of q or k vectors
    ``x`` ``[..., batch, pos, heads, d_head]`` with ``cos``/``sin`` ``[batch or 1, pos, rot]``: the
    first ``rot`` dimensions of each head rotated, the rest passed through (partial rotary)."""
    rot = cos.shape[-1]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)  # [batch, pos, 1, rot]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = torch.cat((-x_rot[..., rot // 2:], x_rot[..., : rot // 2]), dim=-1)
    return torch.cat((x_rot * cos + half * sin, x_pass), dim=-1)


def _zero_grad_of_masked_rows(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
    """Give fully masked query rows (left padding) a zero gradient instead of NaN.

    The bridge adds the padding mask to the scores (-inf) and replaces the NaN softmax of a fully
    masked row by zeros in the forward pass, but the softmax backward of such a row is NaN and the
    addition passes it on to q and k, poisoning every gradient upstream. The pattern of such a row
    is the constant 0, so its true gradient is 0. ``[batch, head, query_pos, key_pos]``.
    """
    if scores.requires_grad:
        dead = ~torch.isfinite(scores).any(-1, keepdim=True)  # [batch, head, query_pos, 1]
        if bool(dead.any()):
            scores.register_hook(lambda grad: grad.masked_fill(dead, 0.0))
    return scores


@hookimpl
def atp_register_hosts(register):
    register(TransformerBridgeHost)

"""What every TransformerLens model object shares: hook names, where hooks sit relative to the
residual stream, tokenization, padding and the width of each hook's value.

``HookedTransformer`` (TransformerLens 3) and ``TransformerBridge`` in compatibility mode
(TransformerLens 3 and 4) expose the same hook names and config fields, so their hosts differ only
in how they run the model and how they learn each layer's attention geometry. Nothing here imports
``transformer_lens``: this module loads under either major version.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError
from ..tokens import check_known
from . import AttentionGeometry, Hook, SitePosition, rounding
from .structure import Structure, structure_of

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
PROBE_LEN = 4  # tokens of the probe prompts the hosts check a model on


def kv_heads(cfg: Any) -> int:
    """Key/value heads at ``hook_k``/``hook_v``: fewer than the query heads under grouped-query
    attention, unless the model ungroups them (``ungroup_grouped_query_attention``: a copy per head)."""
    if getattr(cfg, "ungroup_grouped_query_attention", False):
        return cfg.n_heads
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


#: Trailing shape of a hook's value ``[batch, pos, ...]`` by the hook's last name, from the config.
_SHAPES: dict[str, Callable[[Any], tuple[int, ...]]] = {
    **{h: lambda c: (c.d_model,) for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                            "hook_attn_out", "hook_mlp_out", "hook_embed", "hook_pos_embed")},
    **{h: lambda c: (c.n_heads, c.d_head) for h in ("hook_q", "hook_rot_q", "hook_z")},
    **{h: lambda c: (kv_heads(c), c.d_head) for h in ("hook_k", "hook_rot_k", "hook_v")},
    **{h: lambda c: (c.d_mlp,) for h in ("hook_pre", "hook_pre_linear", "hook_post")},
}


class TransformerLensHost:
    """The parts of a host that read only TransformerLens's hook names and config."""

    name = "TransformerLens"

    def __init__(self, model: Any):
        if any(p.is_meta for p in model.parameters()):
            raise UnsupportedModelError(
                "the model's weights are on the 'meta' device (shapes only, no values), so nothing can be computed; "
                "load real weights first (e.g. model.to_empty(device='cpu') and load a state dict, or load it "
                "without device='meta')")
        self.model = model
        self.cfg = model.cfg
        self.n_layers: int = self.cfg.n_layers
        self.n_heads: int = self.cfg.n_heads
        self.n_kv_heads: int = kv_heads(self.cfg)
        self.d_vocab: int = self.cfg.d_vocab
        self.dtype: torch.dtype = self.cfg.dtype
        self.device: torch.device = next(model.parameters()).device
        # positions the model can see; None where nothing limits them (ALiBi)
        self.n_ctx: int | None = None if getattr(self.cfg, "positional_embedding_type", None) == "alibi" \
            else getattr(self.cfg, "n_ctx", None)
        self._structure: Structure | None = None

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return False  # the shared part serves no model by itself

    def has_hook(self, name: str) -> bool:
        return name in self.model.hook_dict

    def act_shape(self, hook: str) -> tuple[int, ...] | None:
        """The trailing shape of ``hook``'s value after ``[batch, pos]``, or None where unknown."""
        shape = _SHAPES.get(hook.rsplit(".", 1)[-1])
        return shape(self.cfg) if shape is not None else None

    def tokenize(self, text: str) -> list[int]:
        if self.model.tokenizer is None:
            raise ValueError("the model has no tokenizer: pass token tensors [N, T] instead of strings")
        # truncate=False: a prompt past n_ctx must reach the length check, not be cut off silently
        ids = self.model.to_tokens(text, prepend_bos=self.cfg.default_prepend_bos, truncate=False)[0].tolist()
        check_known(self.model.tokenizer, text, ids, "the prompt")
        return ids

    def pad_id(self) -> int:
        tok = self.model.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def run(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            hooks: list[tuple[str, Hook]]) -> torch.Tensor:
        return self.model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks)

    def site_position(self, hook: str) -> SitePosition:
        m = _BLOCK.match(hook)
        if m is None:
            if hook in ("hook_embed", "hook_pos_embed", "hook_tokens"):
                return SitePosition(0, on_resid=True)
            return SitePosition(self.n_layers, on_resid=True)  # ln_final and later: above every layer
        layer, rest = int(m.group(1)), m.group(2)
        if rest in ("hook_resid_pre", "hook_resid_mid"):
            return SitePosition(layer, on_resid=True)
        if rest == "hook_resid_post":
            return SitePosition(layer + 1, on_resid=True)
        return SitePosition(layer, on_resid=False)

    def resid_hooks(self, layer: int) -> tuple[str, str]:
        return f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"

    def attention(self, layer: int) -> AttentionGeometry:
        raise NotImplementedError

    def structure(self) -> Structure:
        """What edges read from the model besides hooks (weights, norms, MLPs): ``structure.Structure``."""
        if self._structure is None:
            self._structure = structure_of(self)
        return self._structure

    def _probe_tokens(self, offset: int = 0) -> torch.Tensor:
        """A fixed probe prompt ``[1, PROBE_LEN]`` (distinct tokens, so attention is not uniform);
        another ``offset`` gives another prompt of the same length."""
        length = min(PROBE_LEN, self.n_ctx or PROBE_LEN)
        return (torch.arange(length, device=self.device) * 7 + 3 + 5 * offset).remainder(self.d_vocab)[None]

    def _probe_run(self, hooks: list[tuple[Any, Hook]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of ``tokens`` (the probe prompt by default) run with ``hooks`` (``run_with_hooks`` entries)."""
        return self.model.run_with_hooks(self._probe_tokens() if tokens is None else tokens, fwd_hooks=hooks)

    def _check_patched_patterns(self, geoms: dict[int, AttentionGeometry]) -> dict[int, str]:
        """Why the QK fix would give wrong numbers in some of the layers of ``geoms``, by layer.

        The fix assumes that patching one query (key) node at ``hook_q`` (``hook_k``) replaces that
        one vector at the geometry's q (k) hook by its value on the corrupt prompt and changes
        nothing else, and that the pattern is the softmax of the scores the geometry forms. On two
        probe prompts this runs the model with one query node and, separately, one key node of each
        layer patched from the second prompt and compares the model's own attention pattern with
        that prediction, so whatever the geometry does not describe between the node's hook and the
        pattern is caught before any run: a norm over all heads' queries (OLMo 2), a wrong scale,
        mask or rotary. Two forward passes for all layers together.
        """
        from ..engine.qk import scores as qk_scores
        from ..engine.qk import unmasked

        layers = sorted(geoms)
        if not layers:
            return {}
        clean, corrupt = self._probe_tokens(), self._probe_tokens(offset=1)
        pos = {"q": clean.shape[1] - 1, "k": max(clean.shape[1] - 2, 0)}  # a row that sees several keys
        node = {(ly, w): f"blocks.{ly}.attn.hook_{w}" for ly in layers for w in "qk"}
        names = set(node.values()) | {h for g in geoms.values() for h in (*g.reads, g.scores_hook, g.pattern_hook)}
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Hook:
            def hook(x: torch.Tensor, hook: Any = None) -> None:
                acts[name] = x.detach().clone()
            return hook

        with torch.no_grad():
            self._probe_run([(h, keep(h)) for h in sorted(names)], torch.cat([clean, corrupt]))
            base = dict(acts)
            copies = [(ly, w) for ly in layers for w in "qk"]  # copy c patches node copies[c] at head 0

            def patch(c: int, ly: int, w: str) -> Hook:
                def hook(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
                    x = x.clone()
                    x[c, pos[w], 0] = base[node[ly, w]][1, pos[w], 0]
                    return x
                return hook

            acts.clear()
            self._probe_run([(node[lw], patch(c, *lw)) for c, lw in enumerate(copies)]
                            + [(g.pattern_hook, keep(g.pattern_hook)) for g in geoms.values()],
                            clean.expand(len(copies), -1))
        found: dict[int, str] = {}
        for i, ly in enumerate(layers):
            g = geoms[ly]
            q, k = g.dotted("q", base)[:1].double(), g.dotted("k", base)[:1].double()  # [1, pos, (kv-)head, d_head]
            seen = unmasked(base[g.scores_hook][:1])
            # the model's own rounding of its softmax (Hugging Face's runs in float32 even in a float64 model)
            own = float((torch.softmax(base[g.scores_hook][:1].double(), -1).nan_to_num(0.0)
                         - base[g.pattern_hook][:1].double()).abs().max())
            for c, w in ((2 * i, "q"), (2 * i + 1, "k")):  # the layer's two copies
                hook = g.q_hook if w == "q" else g.k_hook
                patched = {**base, hook: base[hook].clone()}  # prompt 0 with the node set to prompt 1's
                patched[hook][0, pos[w], 0] = base[hook][1, pos[w], 0]
                new = g.dotted(w, patched)[:1].double()
                predicted = torch.softmax(qk_scores(new, k, seen, g) if w == "q" else qk_scores(q, new, seen, g), -1)
                err = float((predicted.nan_to_num(0.0)[0] - acts[g.pattern_hook][c].double()).abs().max())
                if not err <= rounding(self.dtype) + 4 * own and ly not in found:
                    found[ly] = (
                        f"the QK fix would be wrong in layer {ly} of this model ({type(self.model).__name__}): "
                        f"patching one {'query' if w == 'q' else 'key'} at {node[ly, w]} changes the model's attention "
                        f"pattern by something else than the fix computes from {hook} (mismatch {err:.2g}), e.g. a q/k "
                        "norm over all heads at once (OLMo 2); use method='atp' or 'atp+gd' for attn_q/attn_k nodes, "
                        "or drop them from nodes=")
        return found

    def geometry(self, layer: int, *, scale: float, post: str) -> AttentionGeometry:
        """Layer ``layer``'s geometry with the given score ``scale``; ``post`` is ``"rot_"`` where q
        and k are dotted after rotary."""
        cap = getattr(self.cfg, "attn_scores_soft_cap", None)
        return AttentionGeometry(
            q_hook=f"blocks.{layer}.attn.hook_{post}q", k_hook=f"blocks.{layer}.attn.hook_{post}k",
            scores_hook=f"blocks.{layer}.attn.hook_attn_scores", pattern_hook=f"blocks.{layer}.attn.hook_pattern",
            v_hook=f"blocks.{layer}.attn.hook_v", z_hook=f"blocks.{layer}.attn.hook_z",
            scale=scale, softcap=float(cap) if cap is not None and cap > 0 else None,
            group=self.n_heads // self.n_kv_heads)

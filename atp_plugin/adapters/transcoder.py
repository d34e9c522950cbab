"""Transcoder features as nodes: read at the transcoder's input hook, written at its output hook.

A transcoder reads ``x`` at one hook and its decoder writes at another (e.g.
``blocks.L.ln2.hook_normalized`` -> ``blocks.L.hook_mlp_out``): a SAE-Lens transcoder names them in
``cfg.metadata.hook_name`` and ``hook_name_out``; any other transcoder-shaped object
(``encode(x) -> f``, ``decode(f)``, ``W_dec`` ``[d_sae, d_out]``: a sparsify transcoder, an
``atp_plugin.saes.SimpleSAE``, your own module) gets them from the user (``hook_in=``,
``hook_out=``) or from its ``hook_name`` / ``hook_name_out``.

In the replacement-model view the output site ``a`` splits into the transcoder's output and an
error term, ``a = decode(f) + e`` with ``f = encode(x)`` and ``e = a - decode(f)``, the error frozen
(docs/method.md, "SAE features", with the SAE's input and output split apart). Nodes: feature ``i`` at position ``t``,
value ``f_i(x[t])``, and the error ``e[t]``. Patching feature ``i`` adds ``(f_i' - f_i) W_dec[i]`` to
``a`` (``x`` and so every other feature and the error stay as they are); patching the error node
sets ``e`` to its noise value. AtP: ``(f_i' - f_i) (W_dec[i] . dL/da)`` and ``(e' - e) . dL/da``.

This is what ``HookedSAETransformer.add_sae(transcoder, use_error_term=True)`` runs: its wrapper at
the output hook returns ``decode(encode(x)) + e`` with ``x`` captured at the input hook, so patching
its ``hook_sae_acts_post`` is patching a feature here, and the numbers are the same spliced or not.
A skip transcoder's ``W_skip x`` is not part of SAE-Lens's ``decode`` (nor of sparsify's): as when
spliced, it lies in the error node (it does not change when a feature is patched, since ``x`` does
not).
"""

from __future__ import annotations

from typing import Any

import torch

from ..hosts import Host
from ..saes import SparsifySAE, as_sae_shaped
from .sae import _SPARSIFY_HOOKS, SAEFeatures, _is_sae_lens, _kind, check_sae_shaped, input_width


class TranscoderFeatures(SAEFeatures):
    """Nodes of one transcoder: its features at every position, and its error term. SAE-Lens's
    (``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``, ``JumpReLUSkipTranscoder``) or any
    transcoder-shaped object, with SAE-Lens installed or not.

    Score tensors: ``name`` -> ``[pos, d_sae]`` (dims ``("pos", "feature")``) and
    ``name + ".error"`` -> ``[pos]``, as for ``SAEFeatures``. ``name`` defaults to
    ``"transcoder:<hook_in>-><hook_out>"``. Works on a plain ``HookedTransformer`` or
    ``TransformerBridge`` (the adapter encodes the input hook's value itself) and on a
    ``HookedSAETransformer`` with the transcoder spliced in (``add_sae(transcoder,
    use_error_term=True)``), with the same numbers.

    The adapter's site is the output hook; it ``reads`` the input hook, which must run before it
    (any hook of the same or an earlier layer that feeds the output: checked on the first run).
    GradDrop places the nodes where they write: a transcoder on ``blocks.L.hook_mlp_out`` is part
    of layer L's MLP write (its own cut gives 0, every cut below L leaves its estimate unchanged),
    wherever its input hook sits, because a feature changes the model only through the output hook.
    Transcoders read and write whole vectors ``[batch, pos, d]``: one-head hooks are refused.
    """

    def __init__(self, transcoder: Any, name: str | None = None, *, hook_in: str | None = None,
                 hook_out: str | None = None):
        """``transcoder``: a SAE-Lens transcoder, or any object with ``encode(x)`` (dense features
        ``[..., d_sae]`` of inputs ``[..., d_in]``), ``decode(f)`` (``[..., d_out]``) and ``W_dec``
        ``[d_sae, d_out]`` (a sparsify transcoder is wrapped in ``atp_plugin.saes.SparsifySAE``);
        ``hook_in`` / ``hook_out``: the TransformerLens hooks it reads and writes, where the
        transcoder does not name them (``cfg.metadata.hook_name`` / ``hook_name_out``, or attributes
        ``hook_name`` / ``hook_name_out``)."""
        tc = as_sae_shaped(transcoder)
        if _is_sae_lens(tc):
            from sae_lens import Transcoder
            if not isinstance(tc, Transcoder):
                raise TypeError(f"TranscoderFeatures takes a SAE-Lens Transcoder (Transcoder, SkipTranscoder, "
                                f"JumpReLUTranscoder, ...), got {type(tc).__name__}; for an SAE use SAEFeatures")
        check_sae_shaped(tc, "TranscoderFeatures")
        if isinstance(tc, SparsifySAE) and not tc.transcode:
            raise TypeError(f"{_kind(tc)} is an SAE (cfg.transcode=False: it reconstructs what it reads); use "
                            "SAEFeatures(sae, hook=...) for it, TranscoderFeatures for transcoders")
        cfg: Any = getattr(tc, "cfg", None)
        meta = getattr(cfg, "metadata", None)
        hook_in = hook_in or getattr(meta, "hook_name", None) or getattr(tc, "hook_name", None)
        hook_out = hook_out or getattr(meta, "hook_name_out", None) or getattr(tc, "hook_name_out", None)
        if not hook_in or not hook_out:
            where = ("set transcoder.cfg.metadata.hook_name (the hook it reads) and hook_name_out (the hook it "
                     "writes)" if _is_sae_lens(tc) else
                     "pass them: TranscoderFeatures(transcoder, hook_in=..., hook_out=...)")
            raise ValueError(f"the transcoder does not name both its hooks (hook_in={hook_in!r}, "
                             f"hook_out={hook_out!r}): {where}, e.g. 'blocks.0.ln2.hook_normalized' and "
                             "'blocks.0.hook_mlp_out'" + _SPARSIFY_HOOKS * isinstance(tc, SparsifySAE))
        if hook_in == hook_out:
            raise ValueError(f"the transcoder reads and writes {hook_in!r}; a transcoder maps one hook to another: "
                             "give the hook its decoder writes as hook_out (SAE-Lens: cfg.metadata.hook_name_out); "
                             "an SAE that reconstructs what it reads is SAEFeatures")
        if getattr(meta, "hook_head_index", None) is not None or getattr(meta, "hook_head_index_out", None) is not None:
            raise ValueError("the transcoder reads or writes one attention head (metadata.hook_head_index[_out]); "
                             "transcoders here read and write whole vectors [batch, pos, d], one-head hooks "
                             "are not supported")
        self.sae = tc
        self.hook: str = hook_out  # the site: where the features write
        self.hook_in: str = hook_in
        self.head = None
        self.d_in: int | None = input_width(tc)  # None: not said; checked by the transcoder's encode on the first run
        self.d_out: int = int(tc.W_dec.shape[-1])
        self.name: str = name or f"transcoder:{hook_in}->{hook_out}"

    def reads(self, hook: str) -> tuple[str, ...]:
        """The input hook: the features are computed from its value."""
        return (self.hook_in,)

    def _check(self, host: Host) -> None:
        """Both hooks exist and hold vectors of the transcoder's ``d_in`` and ``d_out`` (checked here
        where the model's config gives a hook's shape, else on the values of the first run)."""
        for hook, key, arg in ((self.hook_in, "hook_name", "hook_in"), (self.hook, "hook_name_out", "hook_out")):
            if not host.has_hook(hook):
                where = f"transcoder.cfg.metadata.{key}" if _is_sae_lens(self.sae) else f"{arg}="
                raise ValueError(f"{self.name}: the model has no hook {hook!r}; this transcoder was trained on another "
                                 f"model or layer, or {arg} names no TransformerLens hook (check {where})")
        self._check_site(host)
        for hook in (self.hook_in, self.hook):
            shape = host.act_shape(hook)
            if shape is not None:
                self._vector(hook, shape)

    def _vector(self, hook: str, shape: tuple[int, ...]) -> None:
        """Check a hook's trailing ``shape`` against the transcoder's width there; a clear error otherwise."""
        what, width = ("d_in", self.d_in) if hook == self.hook_in else ("d_out", self.d_out)
        if len(shape) != 1 or (width is not None and shape[0] != width):
            raise ValueError(f"{self.name}: hook {hook!r} holds [batch, pos, {', '.join(map(str, shape))}], but the "
                             f"transcoder has {what}={width if width is not None else '?'} there (it reads and "
                             "writes vectors); this transcoder was trained on another model or hook")

    # --- node values: the SAE's code with the input (x) and the written site (a) apart ---------
    # Site values here are dicts hook name -> value (the adapter reads another hook: see NodeAdapter),
    # where SAEFeatures gets tensors; typed Any so that these overrides accept what the base takes.
    def _read(self, act: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The input hook's value ``[batch, pos, d_in]`` and the output site's ``[batch, pos, d_out]``."""
        return self._flat(self.hook_in, act[self.hook_in]), self._part(act[self.hook])

    def _part(self, grad: torch.Tensor) -> torch.Tensor:
        return self._flat(self.hook, grad)

    def _flat(self, hook: str, t: torch.Tensor) -> torch.Tensor:
        if t.ndim < 3:
            raise ValueError(f"{self.name}: expected a value [batch, pos, ...] at {hook!r}, got shape {tuple(t.shape)}")
        self._vector(hook, tuple(t.shape[2:]))
        return t

    def _site_out(self, act: Any, x: torch.Tensor) -> torch.Tensor:
        return x.to(act[self.hook].dtype)

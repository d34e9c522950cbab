"""SAE features as nodes: an SAE at its hook, its error term one more node per position.

The SAE is a SAE-Lens SAE or any SAE-shaped object: ``encode(x) -> f`` (dense ``[..., d_sae]``),
``decode(f)`` and a decoder ``W_dec`` ``[d_sae, d_in]``, at a hook the user names (``hook=``). A
sparsify ``Sae``, whose ``encode`` returns top-k activations and indices, is wrapped in
``atp_plugin.saes.SparsifySAE`` here; bare weights go in ``atp_plugin.saes.SimpleSAE``.

The site activation ``a`` splits into the reconstruction and an error term,
``a = decode(f) + e`` with ``f = encode(a)`` and ``e = a - decode(f)`` (so the split is exact by
definition). The error is frozen (docs/method.md, "SAE features"): ``dL/df = J_decode^T dL/da`` (``W_dec . dL/da``
for a plain decoder) and ``dL/de = dL/da``. Patching feature ``i`` sets ``a`` to
``decode(f') + e`` with ``f'`` the clean features but ``f'_i`` from the noise prompt, exactly what
patching ``hook_sae_acts_post`` does in a ``HookedSAETransformer`` with the SAE spliced in
(``use_error_term=True``); patching the error node adds ``e(noise) - e(clean)``.

Everything goes through the SAE's own ``encode``/``decode``, so every SAE-Lens architecture works
as SAE-Lens runs it: ReLU, top-k (with decoder-norm rescaling), JumpReLU, gated, ...; run-time
input normalisation (the decoder's output is denormalised with the scale of the input being
patched, as when spliced); ``hook_z`` SAEs that flatten the heads; SAEs on one head
(``hook_head_index``). Every SAE-Lens decoder is affine in ``f`` for a given input, so a feature's
patch moves ``a`` along its (scaled) decoder row and AtP is first order in the model only.

Transcoders (features read at one hook, written at another) are ``TranscoderFeatures``
(``adapters/transcoder.py``), which reuses this class with its input and output split apart.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..hosts import Host
from ..hosts.spliced import spliced
from ..saes import SparsifySAE, as_sae_shaped


class SAEFeatures:
    """Nodes of one SAE (SAE-Lens's or any SAE-shaped object): its features at every position, and its
    error term.

    Score tensors: ``name`` -> ``[pos, d_sae]`` (dims ``("pos", "feature")``) and
    ``name + ".error"`` -> ``[pos]``. ``name`` defaults to ``"sae:<hook>"``; give SAEs at the same
    hook distinct names. Works on a plain ``HookedTransformer`` and on a ``HookedSAETransformer``
    with the SAE spliced in (``add_sae(sae, use_error_term=True)``), with the same numbers.

    Transcoders (features read at one hook, written at another) are refused here: use
    ``TranscoderFeatures``.
    """

    qk = None

    def __init__(self, sae: Any, name: str | None = None, *, hook: str | None = None):
        """``sae``: a SAE-Lens SAE, or any SAE-shaped object (``encode(x)``, ``decode(f)``, ``W_dec``
        ``[d_sae, d_in]``; e.g. ``atp_plugin.saes.TopKSAE`` or ``SimpleSAE``, your own module, an
        EleutherAI sparsify ``Sae``, which is wrapped in ``atp_plugin.saes.SparsifySAE``); ``hook``: the
        TransformerLens hook it reads, where the SAE does not name it (``cfg.metadata.hook_name``,
        ``cfg.hook_name`` or ``hook_name``)."""
        sae = as_sae_shaped(sae)
        if _is_sae_lens(sae):
            from sae_lens import SAE
            if not isinstance(sae, SAE):
                raise TypeError(f"SAEFeatures takes a SAE-Lens SAE, got {type(sae).__name__}")
        check_sae_shaped(sae, "SAEFeatures")
        if _is_transcoder(sae):
            raise TypeError(
                f"{_kind(sae)} is a transcoder (it reads one hook and writes another); SAEFeatures "
                "supports SAEs that reconstruct the activation they read: use "
                "atp_plugin.adapters.TranscoderFeatures(transcoder) for transcoders")
        cfg: Any = getattr(sae, "cfg", None)
        meta = getattr(cfg, "metadata", None)
        hook = hook or getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None) \
            or getattr(sae, "hook_name", None)
        if not hook:
            raise ValueError("the SAE names no hook: pass SAEFeatures(sae, hook='blocks.0.hook_resid_post') (or set "
                             "sae.cfg.metadata.hook_name) to the TransformerLens hook it reads"
                             + _SPARSIFY_HOOKS * isinstance(sae, SparsifySAE))
        head = getattr(meta, "hook_head_index", None)
        self.sae = sae
        self.hook: str = hook
        self.head: int | None = getattr(cfg, "hook_head_index", None) if head is None else head
        self.name: str = name or f"sae:{hook}"

    # --- layout ------------------------------------------------------------------------------
    def hooks(self, host: Host) -> list[str]:
        """The SAE's hook, after checking that the SAE fits the model there."""
        self._check(host)
        return [self.hook]

    def groups(self, host: Host) -> dict[str, tuple[str, ...]]:
        return {"": ("pos", "feature"), ".error": ("pos",)}

    def _check(self, host: Host) -> None:
        self._check_site(host)
        shape = host.act_shape(self.hook)
        if shape is not None:
            self._fits(shape)

    def _check_site(self, host: Host) -> None:
        """The site ``self.hook`` exists, the SAE is on the model's device, and an SAE spliced there
        keeps its error term."""
        if not host.has_hook(self.hook):
            raise ValueError(f"{self.name}: the model has no hook {self.hook!r}; this SAE was trained on another "
                             "model or layer (check sae.cfg.metadata.hook_name)")
        model = getattr(host, "model", None)
        if self.sae.W_dec.device != host.device:
            raise ValueError(f"{self.name}: the SAE is on {self.sae.W_dec.device} but the model on {host.device}; "
                             f"move it with sae.to({str(host.device)!r})")
        wrapper = spliced(model).get(self.hook)
        if wrapper is not None and not wrapper.use_error_term:
            raise ValueError(f"{self.name}: an SAE is spliced at {self.hook!r} without its error term, so the "
                             "model runs on the reconstruction there; splice it with "
                             "model.add_sae(sae, use_error_term=True) or remove it with model.reset_saes()")

    def _fits(self, shape: tuple[int, ...]) -> None:
        """Check the SAE's input width against a site's trailing ``shape``; a clear error otherwise."""
        d_in = self.sae.W_dec.shape[-1]
        where = f"{self.name}: hook {self.hook!r} holds [batch, pos, {', '.join(map(str, shape))}]"
        if self.head is not None:
            if len(shape) != 2 or not 0 <= self.head < shape[0]:
                raise ValueError(f"{where}, which has no head {self.head} (the SAE's hook_head_index)")
            width = shape[1]
        elif len(shape) == 2 and getattr(getattr(self.sae, "cfg", None), "reshape_activations", None) != "hook_z":
            raise ValueError(f"{where}: an SAE there must flatten the heads (reshape_activations='hook_z') or "
                             "read one head (metadata.hook_head_index)")
        else:
            width = math.prod(shape)
        if width != d_in:
            raise ValueError(f"{where}, {width} values per position, but the SAE has d_in={d_in}; "
                             "this SAE was trained on another model or hook")

    # --- node values -------------------------------------------------------------------------
    def _read(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the SAE encodes of a site value, and the part of the site it writes (the same here)."""
        x = self._sae_in(act)
        return x, x

    def _part(self, grad: torch.Tensor) -> torch.Tensor:
        """The part of a site gradient that the SAE's decoder writes to."""
        return self._sae_in(grad)

    def _sae_in(self, act: torch.Tensor) -> torch.Tensor:
        """What the SAE reads of a site value: ``[batch, pos, d_in]`` (or ``[batch, pos, head,
        d_head]`` for a ``hook_z`` SAE, which flattens the heads itself)."""
        x = act if self.head is None else act[:, :, self.head]
        if x.ndim not in (3, 4):
            raise ValueError(f"{self.name}: expected a site value [batch, pos, ...], got shape {tuple(act.shape)}")
        self._fits(tuple(act.shape[2:]))
        return x

    def _site_out(self, act: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A site value with the SAE's part replaced by ``x``, in the site's dtype."""
        if self.head is None:
            return x.to(act.dtype)
        out = act.clone()
        out[:, :, self.head] = x.to(act.dtype)
        return out

    def _disabled(self):
        """Run the SAE without firing its hook points (shared with the model when it is spliced).

        Note: ``encode`` also records the input's run-time normalisation, which the next ``decode``
        uses (and forgets), so each ``decode`` below follows an ``encode`` of the input it belongs to.
        """
        if not _is_sae_lens(self.sae):
            return contextlib.nullcontext()
        from sae_lens.saes.sae import _disable_hooks
        return _disable_hooks(self.sae)

    def encode(self, hook: str, act: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features ``[batch, pos, d_sae, 1]`` and the error ``[batch, pos, d_in]`` (``d_out`` for a transcoder)."""
        x, a = self._read(act)
        with self._disabled():
            f = self.sae.encode(x)
            err = a - self.sae.decode(f)
        return {"": f[..., None], ".error": _flat(err)}

    def pullback(self, hook: str, act: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dL/df = J_decode^T dL/da`` (``W_dec . dL/da``) ``[batch, pos, d_sae, 1]``; ``dL/de = dL/da``."""
        (x, _), g = self._read(act), self._part(grad)
        with self._disabled():
            f = self.sae.encode(x).detach().requires_grad_(True)  # [batch, pos, d_sae]
            with torch.enable_grad():
                rec = self.sae.decode(f)
            (grad_f,) = torch.autograd.grad(rec, f, g.to(rec.dtype))
        return {"": grad_f[..., None], ".error": _flat(g)}

    def patch(self, hook: str, clean: torch.Tensor, noise: torch.Tensor,
              masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """``decode(f') + e``: selected features (``masks[""]`` ``[batch, pos, d_sae]``) from the noise
        prompt, the error from the noise prompt where ``masks[".error"]`` ``[batch, pos]`` is set."""
        (xc, ac), (xn, an) = self._read(clean), self._read(noise)
        with self._disabled():
            f_noise = self.sae.encode(xn)                    # [batch, pos, d_sae]
            err_noise = an - self.sae.decode(f_noise)         # like a
            f_clean = self.sae.encode(xc)
            err_clean = ac - self.sae.decode(f_clean)
            err = err_clean
            if ".error" in masks:
                m = masks[".error"]  # [batch, pos]
                err = torch.where(m.reshape(m.shape + (1,) * (err.ndim - 2)), err_noise, err_clean)
            if "" in masks:
                self.sae.encode(xc)  # decode with the clean input's normalisation, as when spliced
                out = self.sae.decode(torch.where(masks[""], f_noise, f_clean)) + err
            else:
                out = ac + (err - err_clean)
        return self._site_out(clean, out)


#: the hint for a sparsify coder without a TransformerLens hook
_SPARSIFY_HOOKS = ("; sparsify names Hugging Face modules (hookpoint 'layers.3' is the output of layer 3, "
                   "TransformerLens's 'blocks.3.hook_resid_post'), not TransformerLens hooks")


def check_sae_shaped(sae: Any, who: str) -> None:
    """Raise a ``TypeError`` that says what ``sae`` lacks of an SAE's interface, and how to supply it."""
    methods = [m for m in ("encode", "decode") if not callable(getattr(sae, m, None))]
    has_w_dec = isinstance(getattr(sae, "W_dec", None), torch.Tensor)
    if not methods and has_w_dec:
        return
    lacks = " and ".join(([repr(methods)] if methods else []) + ([] if has_w_dec else ["a tensor W_dec"]))
    weights = [w for w in ("W_enc", "b_enc", "W_dec", "b_dec") if isinstance(getattr(sae, w, None), torch.Tensor)]
    if len(weights) == 4:
        fix = ("it has the weights W_enc, b_enc, W_dec, b_dec: wrap them, atp_plugin.saes.SimpleSAE(sae.W_enc, "
               "sae.b_enc, sae.W_dec, sae.b_dec, activation=torch.relu) (W_enc [d_in, d_sae], W_dec [d_sae, d_out])")
    else:
        fix = ("give it encode(x) -> features [..., d_sae], decode(features) -> [..., d_out] and a tensor W_dec "
               "[d_sae, d_out] (a wrapper module of a few lines does; see docs/custom_adapters.md, 'SAE features'), "
               "or build atp_plugin.saes.SimpleSAE(W_enc, b_enc, W_dec, b_dec, activation) from its weights")
    raise TypeError(f"{who} takes an SAE: an object with encode(x), decode(f) and a decoder W_dec [d_sae, d_out]; "
                    f"{_kind(sae)} lacks {lacks}: {fix}")


def input_width(sae: Any) -> int | None:
    """The width of what ``sae`` encodes, where it says: ``cfg.d_in``, ``d_in``, or ``W_enc``'s dimension
    that is not ``d_sae``; None where it does not."""
    for width in (getattr(getattr(sae, "cfg", None), "d_in", None), getattr(sae, "d_in", None)):
        if isinstance(width, int):
            return width
    w_enc, d_sae = getattr(sae, "W_enc", None), sae.W_dec.shape[0]
    if isinstance(w_enc, torch.Tensor) and w_enc.ndim == 2 and d_sae in w_enc.shape:
        return int(w_enc.shape[0] if w_enc.shape[1] == d_sae else w_enc.shape[1])
    return None


def _is_transcoder(sae: Any) -> bool:
    """Whether ``sae`` maps one activation to another rather than reconstructing what it reads."""
    if _is_sae_lens(sae):
        return hasattr(sae.cfg, "d_out") or sae.W_dec.shape[-1] != sae.cfg.d_in
    if isinstance(sae, SparsifySAE):
        return sae.transcode
    d_in = input_width(sae)
    return d_in is not None and d_in != sae.W_dec.shape[-1]


def _kind(sae: Any) -> str:
    """How errors name ``sae``: its class, or the class it wraps."""
    if isinstance(sae, SparsifySAE):
        return f"sparsify's {type(sae.coder).__name__}"
    return type(sae).__name__


def _is_sae_lens(sae: Any) -> bool:
    """Whether ``sae`` is SAE-Lens's (without importing SAE-Lens, which may be absent)."""
    return type(sae).__module__.startswith("sae_lens")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, ...]`` -> ``[batch, pos, features]``."""
    return x.reshape(x.shape[0], x.shape[1], -1)

"""SAEs and transcoders that are not SAE-Lens's, on a ``TransformerBridge`` (TransformerLens 3 and 4,
no SAE-Lens needed): EleutherAI's sparsify (``pip install eai-sparsify``; its tests are skipped,
with that reason, where it is not installed), a plain ``nn.Module`` and ``atp_plugin.saes.SimpleSAE``.

References, written here with TransformerLens hooks on the Bridge and each library's own API:

- exact patching of feature i at position t: the site at t set to ``decode(f') + e``, ``f'`` the
  clean features with feature i from the corrupt prompt and ``e = a - decode(f)`` the clean error;
  of the error node: ``decode(f) + e(corrupt)``. For sparsify through its sparse API alone:
  ``decode(top_acts, top_indices)`` with feature i's clean activation removed and its corrupt one
  (0 where not in the corrupt top-k) appended;
- AtP: ``(f_i' - f_i) (W_dec[i] . dL/da)`` and ``(e' - e) . dL/da``, dL/da from the Bridge's autograd.
  Where the metric is linear in the written site (``ln_final.hook_normalized`` feeds the
  unembedding), AtP must equal exact patching, and it is checked against it.

Models, SAEs and transcoders have random float64 weights (no downloads).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
import transformers

from atp_plugin import attribute
from atp_plugin.adapters import SAEFeatures, TranscoderFeatures
from atp_plugin.saes import SimpleSAE, SparsifySAE
from helpers import bridge_pairs, close, sparsify_coder
from hf_models import load_bridge, save_gpt2

N, T, D, D_SAE, K = 3, 6, 32, 24, 4
MID = "blocks.0.hook_resid_post"
LINEAR = "ln_final.hook_normalized"  # feeds the unembedding: the metric is linear in it
MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
LAST = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_bridge(save_gpt2(tmp_path_factory.mktemp("gpt2")))


# --- the SAEs -----------------------------------------------------------------------------------
class ModuleTranscoder(torch.nn.Module):
    """A user's own transcoder: a JumpReLU encoder ``[d_in, d_sae]`` and a linear decoder, nothing else."""

    def __init__(self, d_in: int = D, d_out: int = D, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, D_SAE, generator=g, dtype=torch.float64) * 0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(D_SAE, generator=g, dtype=torch.float64) * 0.3)
        self.threshold = torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.5
        self.W_dec = torch.nn.Parameter(torch.randn(D_SAE, d_out, generator=g, dtype=torch.float64) * 0.3)
        self.b_dec = torch.nn.Parameter(torch.randn(d_out, generator=g, dtype=torch.float64) * 0.3)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        return pre * (pre > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def simple_sae(seed: int = 0, **kw) -> SimpleSAE:
    """A ReLU ``SimpleSAE`` D -> D with random float64 weights, biased so that some features are off."""
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(*shape, generator=g, dtype=torch.float64) * s
         for shape, s in (((D, D_SAE), 0.5), ((D_SAE,), 0.3), ((D_SAE, D), 0.3), ((D,), 0.3))]
    return SimpleSAE(*w, activation=torch.relu, **kw)


# --- the references ----------------------------------------------------------------------------
Rows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sparsify_rows(coder) -> Rows:
    """Site vectors with one node patched, through sparsify's sparse ``encode``/``decode`` only.

    Given the input site's values ``x``, ``x_noise`` ``[R, d_in]`` and the written site's ``a``,
    ``a_noise`` ``[R, d_out]`` (R positions), returns ``[R, d_sae, d_out]`` (row i: feature i from
    the noise prompt) and ``[R, d_out]`` (the error from the noise prompt)."""
    def rows(x, x_noise, a, a_noise):
        c, z = coder.encode(x), coder.encode(x_noise)              # top_acts, top_indices [R, K]
        rec = coder.decode(c.top_acts, c.top_indices)              # [R, d_out]
        err, err_noise = a - rec, a_noise - coder.decode(z.top_acts, z.top_indices)
        i = torch.arange(D_SAE)[None, :, None]                     # [1, d_sae, 1]
        noise_value = torch.where(z.top_indices[:, None] == i, z.top_acts[:, None], 0.0).sum(-1)  # [R, d_sae]
        acts = torch.where(c.top_indices[:, None] == i, 0.0, c.top_acts[:, None])               # [R, d_sae, K]
        acts = torch.cat([acts, noise_value[..., None]], -1)                                    # [R, d_sae, K+1]
        idx = torch.cat([c.top_indices[:, None].expand(-1, D_SAE, -1), i.expand(len(x), -1, -1)], -1)
        patched = coder.decode(acts.flatten(0, 1), idx.flatten(0, 1)).unflatten(0, (len(x), D_SAE))
        return patched + err[:, None], rec + err_noise
    return rows


def dense_rows(module) -> Rows:
    """As ``sparsify_rows``, through a module's own dense ``encode``/``decode``."""
    def rows(x, x_noise, a, a_noise):
        f, f_noise = module.encode(x), module.encode(x_noise)     # [R, d_sae]
        err, err_noise = a - module.decode(f), a_noise - module.decode(f_noise)
        one = torch.eye(D_SAE, dtype=torch.bool)
        patched = module.decode(torch.where(one, f_noise[:, None], f[:, None]))  # [R, d_sae(i), d_out]
        return patched + err[:, None], module.decode(f) + err_noise
    return rows


def dense_features(coder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's features ``[R, d_sae]`` of ``x`` ``[R, d_in]``: top_acts at top_indices, 0 elsewhere."""
    out = coder.encode(x)
    return torch.where(out.top_indices[:, None] == torch.arange(D_SAE)[None, :, None], out.top_acts[:, None], 0.0
                       ).sum(-1)


def exact_effects(bridge, hook_in: str, hook_out: str, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed effects of patching each feature ``[N, T, d_sae]`` and each error node ``[N, T]`` of one
    SAE (``hook_in == hook_out``) or transcoder, each from its own run of the Bridge with the written
    site at one position replaced by the vector ``rows`` gives."""
    clean, corrupt, metric = bridge_pairs(n=N, t=T)
    with torch.no_grad():
        _, c = bridge.run_with_cache(clean, names_filter=[hook_in, hook_out])
        _, z = bridge.run_with_cache(corrupt, names_filter=[hook_in, hook_out])
        feature_rows, error_rows = rows(c[hook_in].flatten(0, 1), z[hook_in].flatten(0, 1),
                                        c[hook_out].flatten(0, 1), z[hook_out].flatten(0, 1))
        feature_rows = feature_rows.unflatten(0, (N, T))          # [N, T, d_sae, d_out]
        error_rows = error_rows.unflatten(0, (N, T))              # [N, T, d_out]
        base = metric(bridge(clean), torch.arange(N))
        features, errors = torch.zeros(N, T, D_SAE, dtype=torch.float64), torch.zeros(N, T, dtype=torch.float64)
        for p in range(N):
            for out, new in ((features, feature_rows[p].flatten(0, 1)), (errors, error_rows[p])):
                pos = torch.arange(T).repeat_interleave(len(new) // T)  # copy k sets position pos[k]

                def put(a, hook, new=new, pos=pos):
                    a = a.clone()
                    a[torch.arange(len(pos)), pos] = new.to(a.dtype)
                    return a

                logits = bridge.run_with_hooks(clean[p].expand(len(new), T), fwd_hooks=[(hook_out, put)])
                out[p] = (metric(logits, torch.full((len(new),), p)) - base[p]).reshape(out[p].shape)
    return features, errors


def site_gradient(bridge, clean: torch.Tensor, metric, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean value at ``hook`` ``[N, T, d]`` and d(summed metric)/d(it), from the Bridge's autograd
    (tests/conftest.clean_gradients keys by the hook's own name, which on the Bridge may be an alias)."""
    kept = {}

    def keep(x, hook):
        kept["a"] = x
        return x

    with torch.enable_grad():
        logits = bridge.run_with_hooks(clean, fwd_hooks=[(hook, keep)])
        (grad,) = torch.autograd.grad(metric(logits, torch.arange(len(clean))).sum(), kept["a"])
    return kept["a"].detach(), grad


def first_order(bridge, hook_in: str, hook_out: str, features: Callable[[torch.Tensor], torch.Tensor],
                decode: Callable[[torch.Tensor], torch.Tensor], W_dec: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-pair AtP of each feature ``[N, T, d_sae]`` and error node ``[N, T]``: (f' - f)(W_dec . g),
    (e' - e) . g with g = dL/da at the written site from the Bridge's autograd."""
    clean, corrupt, metric = bridge_pairs(n=N, t=T)
    a, grad = site_gradient(bridge, clean, metric, hook_out)
    with torch.no_grad():
        _, c = bridge.run_with_cache(clean, names_filter=[hook_in])
        _, z = bridge.run_with_cache(corrupt, names_filter=[hook_in, hook_out])
        f, f_noise = (features(v[hook_in].flatten(0, 1)).unflatten(0, (N, T)) for v in (c, z))
        err, err_noise = a - decode(f), z[hook_out] - decode(f_noise)
        return (f_noise - f) * (grad @ W_dec.T), ((err_noise - err) * grad).sum(-1)


def attributions(bridge, adapter) -> dict[str, Any]:
    """``ap`` and ``atp`` results of one adapter on the Bridge, on the pairs of ``exact_effects``."""
    clean, corrupt, metric = bridge_pairs(n=N, t=T)
    return {m: attribute(bridge, clean, corrupt, metric, nodes=[adapter], method=m) for m in ("ap", "atp")}


def check(bridge, adapter, hook_in: str, hook_out: str, rows: Rows, per_pair_atp: tuple[torch.Tensor, ...] | None,
          what: str) -> None:
    """``ap`` against exact patching; ``atp`` against exact patching where the metric is linear in
    the written site (``per_pair_atp`` None), else against the first-order formula ``per_pair_atp``."""
    got = attributions(bridge, adapter)
    exact = exact_effects(bridge, hook_in, hook_out, rows)
    assert (exact[0].mean(0) != 0).sum() >= 2 * T, f"{what}: hardly any feature changes, the test proves little"
    for j, key in enumerate((adapter.name, adapter.name + ".error")):
        close(got["ap"].signed[key], exact[j].mean(0), f"{what}: ap of {key} vs patching with hooks")
        if per_pair_atp is None:
            close(got["atp"].signed[key], exact[j].mean(0), f"{what}: atp == exact patching of {key} (linear site)")
        else:
            close(got["atp"].signed[key], per_pair_atp[j].mean(0), f"{what}: atp of {key} vs the formula")
            close(got["atp"].scores[key], per_pair_atp[j].abs().mean(0), f"{what}: |atp| of {key} vs the formula")


# --- sparsify -------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["topk", "groupmax"])
def test_the_sparsify_shim_is_sparsifys_own_encode_and_decode(activation: str) -> None:
    coder = sparsify_coder(activation=activation)
    shim = SparsifySAE(coder)
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows = x.flatten(0, 1)
    with torch.no_grad():
        out, f = coder.encode(rows), shim.encode(x)
        assert f.shape == (2, 5, D_SAE) and shim.W_dec is coder.W_dec and shim.d_in == D
        close(f.flatten(0, 1), dense_features(coder, rows), f"{activation}: dense features")
        active = (out.top_acts != 0).sum(-1)  # groupmax may pick a zero in a group
        assert ((f != 0).flatten(0, 1).sum(-1) == active).all() and active.sum() > K, f"{activation}: active latents"
        close(shim.decode(f).flatten(0, 1), coder.decode(out.top_acts, out.top_indices), f"{activation}: decode")
        close(shim.decode(f).flatten(0, 1), coder(rows).sae_out, f"{activation}: decode(encode(x)) == forward")


@pytest.mark.parametrize("hook", [MID, LINEAR])
def test_a_sparsify_sae_against_patching_with_hooks(bridge, hook: str) -> None:
    coder = sparsify_coder(seed=1)
    linear = hook == LINEAR
    atp = None if linear else first_order(bridge, hook, hook, lambda x: dense_features(coder, x),
                                          lambda f: f @ coder.W_dec + coder.b_dec, coder.W_dec)
    check(bridge, SAEFeatures(coder, hook=hook), hook, hook, sparsify_rows(coder), atp, f"sparsify SAE at {hook}")


@pytest.mark.parametrize("hooks,skip", [((MLP_IN, MLP_OUT), False), ((MLP_IN, MLP_OUT), True), ((LAST, LINEAR), False)],
                         ids=["mlp", "mlp_skip", "linear_site"])
def test_a_sparsify_transcoder_against_patching_with_hooks(bridge, hooks: tuple[str, str], skip: bool) -> None:
    """Layer 0's MLP (with and without a skip connection, which lies in the error node), and a
    transcoder writing where the metric is linear."""
    coder = sparsify_coder(transcoder=True, skip=skip, seed=2)
    hook_in, hook_out = hooks
    linear = hook_out == LINEAR
    atp = None if linear else first_order(bridge, hook_in, hook_out, lambda x: dense_features(coder, x),
                                          lambda f: f @ coder.W_dec + coder.b_dec, coder.W_dec)
    adapter = TranscoderFeatures(coder, hook_in=hook_in, hook_out=hook_out)
    assert adapter.name == f"transcoder:{hook_in}->{hook_out}"
    check(bridge, adapter, hook_in, hook_out, sparsify_rows(coder), atp, f"sparsify transcoder {hook_in}->{hook_out}")


@pytest.fixture(scope="module")
def unprocessed(tmp_path_factory):
    """The GPT-2 as a Hugging Face model and as a Bridge in compatibility mode without weight
    processing (``no_processing=True``), whose hooks carry the Hugging Face modules' values."""
    path = save_gpt2(tmp_path_factory.mktemp("gpt2_raw"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = load_bridge(path, compatibility=False)
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval(), bridge.eval()


def hf_module_effects(hf, hookpoint: str, transcode: bool, rows: Rows) -> tuple[torch.Tensor, ...]:
    """What a sparsify user measures on the Hugging Face model at a sparsify ``hookpoint`` (a module
    of ``hf.base_model``; an SAE reads and writes its output, a transcoder reads its input and writes
    its output), with PyTorch hooks: exact effects of every feature ``[N, T, d_sae]`` and error node
    ``[N, T]`` (one run per node, as ``exact_effects``), and per-pair AtP of both with dL/d(output)
    from autograd."""
    module = hf.base_model.get_submodule(hookpoint)
    clean, corrupt, metric = bridge_pairs(n=N, t=T)
    seen: dict[str, torch.Tensor] = {}
    replace: dict[str, Any] = {}

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen["x"], seen["a"] = (args[0] if transcode else out), out
        if "rows" in replace:
            out = out.clone()
            out[torch.arange(len(replace["pos"])), replace["pos"]] = replace["rows"]
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return output

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            hf(corrupt)
            x_noise, a_noise = seen["x"], seen["a"]
            base = metric(hf(clean).logits, torch.arange(N))
            x, a = seen["x"], seen["a"]
            feature_rows, error_rows = rows(x.flatten(0, 1), x_noise.flatten(0, 1), a.flatten(0, 1),
                                            a_noise.flatten(0, 1))
            feature_rows, error_rows = feature_rows.unflatten(0, (N, T)), error_rows.unflatten(0, (N, T))
            features, errors = torch.zeros(N, T, D_SAE, dtype=torch.float64), torch.zeros(N, T, dtype=torch.float64)
            for p in range(N):
                for out, new in ((features, feature_rows[p].flatten(0, 1)), (errors, error_rows[p])):
                    replace.update(rows=new, pos=torch.arange(T).repeat_interleave(len(new) // T))
                    logits = hf(clean[p].expand(len(new), T)).logits
                    out[p] = (metric(logits, torch.full((len(new),), p)) - base[p]).reshape(out[p].shape)
                    replace.clear()
        with torch.enable_grad():
            total = metric(hf(clean).logits, torch.arange(N)).sum()
            (grad,) = torch.autograd.grad(total, seen["a"])
    finally:
        handle.remove()
    return features, errors, grad, x, x_noise, a, a_noise


@pytest.mark.parametrize("transcode", [False, True], ids=["sae", "transcoder"])
def test_sparsify_at_its_own_hookpoint_on_the_hugging_face_model(unprocessed, transcode: bool) -> None:
    """sparsify trains on Hugging Face modules: an SAE at hookpoint ``h.0`` (layer 0's output) is
    ``blocks.0.hook_resid_post`` and a transcoder at ``h.0.mlp`` reads ``blocks.0.ln2.hook_normalized``
    and writes ``blocks.0.hook_mlp_out`` on a Bridge without weight processing. The library's ``ap``
    and ``atp`` there equal patching and AtP written with PyTorch hooks on the Hugging Face model."""
    hf, bridge = unprocessed
    coder = sparsify_coder(transcoder=transcode, seed=7)
    features, errors, grad, x, x_noise, a, a_noise = hf_module_effects(hf, "h.0.mlp" if transcode else "h.0",
                                                                       transcode, sparsify_rows(coder))
    adapter = (TranscoderFeatures(coder, hook_in=MLP_IN, hook_out=MLP_OUT) if transcode
               else SAEFeatures(coder, hook=MID))
    with torch.no_grad():
        f, f_noise = (dense_features(coder, v.flatten(0, 1)).unflatten(0, (N, T)) for v in (x, x_noise))
        err = a - (f @ coder.W_dec + coder.b_dec)
        err_noise = a_noise - (f_noise @ coder.W_dec + coder.b_dec)
        atp = ((f_noise - f) * (grad @ coder.W_dec.T), ((err_noise - err) * grad).sum(-1))
    got = attributions(bridge, adapter)
    assert (features.mean(0) != 0).sum() >= 2 * T, "hardly any feature changes, the test proves little"
    for j, (key, exact) in enumerate(((adapter.name, features), (adapter.name + ".error", errors))):
        close(got["ap"].signed[key], exact.mean(0), f"ap of {key} vs patching the Hugging Face module")
        close(got["atp"].signed[key], atp[j].mean(0), f"atp of {key} vs AtP on the Hugging Face module")


def test_sparsify_objects_sent_to_the_wrong_adapter_are_clear_errors() -> None:
    sae, tc = sparsify_coder(), sparsify_coder(transcoder=True)
    with pytest.raises(TypeError, match=r"sparsify's SparseCoder is a transcoder .*TranscoderFeatures\(transcoder\)"):
        SAEFeatures(tc, hook=MID)
    with pytest.raises(TypeError, match=r"is an SAE \(cfg.transcode=False.*SAEFeatures\(sae, hook=\.\.\.\)"):
        TranscoderFeatures(sae, hook_in=MLP_IN, hook_out=MLP_OUT)
    with pytest.raises(ValueError, match=r"pass SAEFeatures\(sae, hook=.*sparsify names Hugging Face modules.*"
                                         r"'blocks\.3\.hook_resid_post'"):
        SAEFeatures(sae)
    with pytest.raises(ValueError, match=r"TranscoderFeatures\(transcoder, hook_in=\.\.\., hook_out=\.\.\.\).*"
                                         "sparsify names Hugging Face modules"):
        TranscoderFeatures(tc, hook_in=MLP_IN)
    sae.W_dec = None
    with pytest.raises(ValueError, match="decoder=True"):
        SAEFeatures(sae, hook=MID)


# --- no library: a user's module and SimpleSAE ------------------------------------------------------
@pytest.mark.parametrize("kind", ["module", "simple_sae"])
def test_a_transcoder_module_without_sae_lens_against_patching_with_hooks(bridge, kind: str) -> None:
    tc = ModuleTranscoder(seed=4) if kind == "module" else simple_sae(seed=4)
    atp = first_order(bridge, MLP_IN, MLP_OUT, tc.encode, tc.decode, tc.W_dec)
    check(bridge, TranscoderFeatures(tc, hook_in=MLP_IN, hook_out=MLP_OUT), MLP_IN, MLP_OUT, dense_rows(tc), atp,
          f"{kind} transcoder")


def test_a_simple_sae_at_a_linear_site_against_patching_with_hooks(bridge) -> None:
    sae = simple_sae(seed=5, hook_name=LINEAR, subtract_b_dec=True)
    check(bridge, SAEFeatures(sae), LINEAR, LINEAR, dense_rows(sae), None, "SimpleSAE at the linear site")


def test_simple_sae_is_its_formula() -> None:
    sae = simple_sae(subtract_b_dec=True)
    x = torch.randn(2, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        close(sae.encode(x), f, "SimpleSAE.encode")
        close(sae.decode(f), f @ sae.W_dec + sae.b_dec, "SimpleSAE.decode")
    assert 0 < int((f == 0).sum()) < f.numel(), "ReLU leaves some features on and some off"


def test_objects_that_are_not_transcoders_are_refused_by_what_they_lack(bridge) -> None:
    class Weights(torch.nn.Module):
        """Weights without encode/decode."""

        def __init__(self, tc):
            super().__init__()
            self.W_enc, self.b_enc, self.W_dec, self.b_dec = tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec

    with pytest.raises(TypeError, match=r"TranscoderFeatures takes an SAE: .*Linear lacks \['encode', 'decode'\] "
                                        r"and a tensor W_dec: give it encode\(x\)"):
        TranscoderFeatures(torch.nn.Linear(3, 3), hook_in=MLP_IN, hook_out=MLP_OUT)
    with pytest.raises(TypeError, match=r"Weights lacks \['encode', 'decode'\]: it has the weights .*SimpleSAE\("):
        TranscoderFeatures(Weights(ModuleTranscoder()), hook_in=MLP_IN, hook_out=MLP_OUT)
    no_decoder = ModuleTranscoder()
    del no_decoder.W_dec
    with pytest.raises(TypeError, match=r"ModuleTranscoder lacks a tensor W_dec: give it .*W_dec \[d_sae, d_out\]"):
        TranscoderFeatures(no_decoder, hook_in=MLP_IN, hook_out=MLP_OUT)
    with pytest.raises(ValueError, match=r"does not name both its hooks \(hook_in=None, hook_out=None\): pass them"):
        TranscoderFeatures(ModuleTranscoder())
    with pytest.raises(ValueError, match="reads and writes 'blocks.0.hook_mlp_out'.*SAEFeatures"):
        TranscoderFeatures(ModuleTranscoder(), hook_in=MLP_OUT, hook_out=MLP_OUT)
    with pytest.raises(TypeError, match=r"ModuleTranscoder is a transcoder .*TranscoderFeatures"):
        SAEFeatures(ModuleTranscoder(d_in=16), hook=MID)
    clean, corrupt, metric = bridge_pairs(n=N, t=T)
    wrong = [(ModuleTranscoder(d_in=16), "d_in=16"), (ModuleTranscoder(d_out=20), "d_out=20"),
             (simple_sae(), r"\[batch, pos, 4, 8\]")]
    with pytest.raises(ValueError, match=r"no hook 'h\.0\.mlp'.*names no TransformerLens hook \(check hook_in=\)"):
        attribute(bridge, clean, corrupt, metric, method="atp",  # a sparsify hookpoint is not a hook name
                  nodes=[TranscoderFeatures(ModuleTranscoder(), hook_in="h.0.mlp", hook_out=MLP_OUT)])
    for tc, match in wrong:  # a width that does not fit is named
        out = "blocks.0.attn.hook_z" if match.startswith(r"\[") else MLP_OUT
        with pytest.raises(ValueError, match=match):
            attribute(bridge, clean, corrupt, metric, nodes=[TranscoderFeatures(tc, hook_in=MLP_IN, hook_out=out)],
                      method="atp")

"""SAE features without SAE-Lens: the bundled demo SAE as a plain ``TopKSAE`` and any SAE-shaped
module, checked against SAE-Lens's own SAE (where installed) and against hand-computed AtP."""

from __future__ import annotations

import importlib.util
from importlib.resources import files

import pytest
import torch

from atp_plugin import attribute, metrics
from atp_plugin.adapters import SAEFeatures
from atp_plugin.demo_task import ioi_pairs, load_demo_model
from atp_plugin.saes import TopKSAE

SAE_DIR = files("atp_plugin").joinpath("data").joinpath("sae")
HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


@pytest.mark.skipif(not HAS_SAE_LENS, reason="compares with SAE-Lens, which is not installed (atp-plugin[sae])")
def test_topk_sae_equals_sae_lens_on_the_demo_sae():
    from sae_lens import SAE
    ours = TopKSAE.load(SAE_DIR, dtype=torch.float64)
    theirs = SAE.load_from_disk(SAE_DIR, dtype="float64")
    x = torch.randn(3, 7, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-12, atol=1e-12)
    f = ours.encode(x)
    torch.testing.assert_close(ours.decode(f), theirs.decode(f), rtol=1e-12, atol=1e-12)


def test_a_plain_module_sae_gives_hand_computed_atp_on_the_demo_model():
    """AtP of feature i: (f_i(noise) - f_i(clean)) (W_dec[i] . dL/da); of the error node:
    (e(noise) - e(clean)) . dL/da, with e = a - decode(encode(a)); dL/da from plain autograd."""
    model = load_demo_model(dtype=torch.float64)
    sae = TopKSAE.load(SAE_DIR, dtype=torch.float64)
    task = ioi_pairs(3)
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    result = attribute(model, task.clean, task.corrupt, metric, nodes=[SAEFeatures(sae)], method="atp")
    hook = sae.hook_name
    clean, corrupt = model.to_tokens(task.clean), model.to_tokens(task.corrupt)
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts["a"] = x
        return x
    logits = model.run_with_hooks(clean, fwd_hooks=[(hook, keep)])
    metric(logits, torch.arange(3)).sum().backward()
    a, grad = acts["a"].detach(), acts["a"].grad
    noisy = {}
    model.run_with_hooks(corrupt, fwd_hooks=[(hook, lambda x, hook: noisy.setdefault("a", x.detach()))])
    with torch.no_grad():
        fc, fn = sae.encode(a), sae.encode(noisy["a"])
        features = (fn - fc) * (grad @ sae.W_dec.T)                               # [batch, pos, d_sae]
        error = ((noisy["a"] - sae.decode(fn)) - (a - sae.decode(fc))).mul(grad).sum(-1)  # [batch, pos]
    torch.testing.assert_close(result.signed[f"sae:{hook}"], features.mean(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.signed[f"sae:{hook}.error"], error.mean(0), rtol=1e-9, atol=1e-10)
    verified = result.verify(3)
    assert verified["effect"].notna().all()


def test_an_object_that_is_not_an_sae_is_refused_by_what_it_lacks():
    with pytest.raises(TypeError, match=r"encode\(x\), decode\(f\).*lacks \['encode', 'decode'\]"):
        SAEFeatures(torch.nn.Linear(3, 3), hook="blocks.0.hook_resid_pre")
    sae = TopKSAE.load(SAE_DIR)
    sae.hook_name = ""
    with pytest.raises(ValueError, match=r"names no hook.*SAEFeatures\(sae, hook="):
        SAEFeatures(sae)

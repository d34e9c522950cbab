"""The transcoders shipped with the demo model (``load_demo_transcoders``) and ``saes.TopK``, under
whichever TransformerLens is installed (4: a ``TransformerBridge``; 3: a ``HookedTransformer``).

- Four transcoders, layer L's reading ``blocks.L.ln2.hook_normalized`` and writing
  ``blocks.L.hook_mlp_out``, as ``SimpleSAE(..., activation=TopK(16))`` in float32.
- On held-out (test split) prompts each explains at least 93% of the variance of its MLP's output
  (``scripts/train_demo_transcoders.py`` measured 0.949 to 0.977 on 2000 pairs), computed here from
  the model's own hooks and plain matrix products, with exactly k=16 active features per token; with
  all four MLP outputs replaced (BOS kept), the model keeps most of its logit difference.
- ``TopK`` equals a per-position top-k written out with a loop.
- ``TranscoderFeatures(tc)`` ranks the demo model's transcoder features with ``method="atp"``, and
  its scores equal AtP written out: ``(f_corrupt - f_clean)[t, i] * (W_dec[i] . g_t)``, ``g`` the
  metric's gradient at ``hook_mlp_out`` on the clean prompts, averaged over pairs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from atp_plugin import attribute, metrics
from atp_plugin.adapters import TranscoderFeatures
from atp_plugin.demo_task import PROMPT_LENGTH, ioi_pairs, load_demo_model, load_demo_transcoders
from atp_plugin.saes import SimpleSAE, TopK, TopKSAE

K, D_SAE, N_LAYERS = 16, 512, 4
EV_FLOOR = 0.93  # the script measured >= 0.949 per layer on 2000 held-out pairs


@pytest.fixture(scope="module")
def model() -> Any:
    return load_demo_model()


@pytest.fixture(scope="module")
def transcoders() -> list[SimpleSAE]:
    return load_demo_transcoders()


def _naive_top_k(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per position: the k largest entries (ReLU'd) where they are, zeros elsewhere."""
    out = torch.zeros_like(pre)
    rows = pre.reshape(-1, pre.shape[-1])
    flat = out.view(-1, pre.shape[-1])
    for r, row in enumerate(rows):
        largest = sorted(range(len(row)), key=lambda j: -float(row[j]))[:k]
        for j in largest:
            flat[r, j] = max(float(row[j]), 0.0)
    return out


def test_top_k_equals_a_naive_per_position_top_k() -> None:
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 5, 40, generator=generator, dtype=torch.float64) - 0.8  # some kept entries are < 0
    for k in (1, 7, 40):
        assert torch.equal(TopK(k)(pre), _naive_top_k(pre, k)), k
    assert (TopK(7)(pre) != 0).sum(-1).max() <= 7 and (_naive_top_k(pre, 7) < 0).sum() == 0
    # as SimpleSAE's activation, and TopKSAE's encoder: the same function
    w_enc, b_enc = torch.randn(6, 40, generator=generator), torch.randn(40, generator=generator)
    w_dec, b_dec = torch.randn(40, 6, generator=generator), torch.randn(6, generator=generator)
    x = torch.randn(4, 6, generator=generator)
    sae = SimpleSAE(w_enc, b_enc, w_dec, b_dec, activation=TopK(5))
    assert torch.equal(sae.encode(x), _naive_top_k(x @ w_enc + b_enc, 5))
    topk_sae = TopKSAE(w_enc, b_enc, w_dec, b_dec, 5, "blocks.0.hook_resid_pre")
    assert torch.equal(topk_sae.encode(x), _naive_top_k((x - b_dec) @ w_enc + b_enc, 5))
    assert TopK(3).k == 3 and "k=3" in repr(TopK(3))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            TopK(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least k"):
        TopK(41)(pre)


def test_shipped_transcoders_fit_the_demo_model(model: Any, transcoders: list[SimpleSAE]) -> None:
    assert len(transcoders) == N_LAYERS == model.cfg.n_layers
    for layer, tc in enumerate(transcoders):
        assert isinstance(tc, SimpleSAE) and isinstance(tc.activation, TopK) and tc.activation.k == K
        assert tc.hook_name == f"blocks.{layer}.ln2.hook_normalized" and tc.hook_name in model.hook_dict
        assert tc.hook_name_out == f"blocks.{layer}.hook_mlp_out" and tc.hook_name_out in model.hook_dict
        assert tc.W_enc.shape == (model.cfg.d_model, D_SAE) and tc.W_dec.shape == (D_SAE, model.cfg.d_model)
        assert tc.b_enc.shape == (D_SAE,) and tc.b_dec.shape == (model.cfg.d_model,)
        assert tc.W_dec.dtype == torch.float32 and not tc.subtract_b_dec and not tc.training
    assert load_demo_transcoders(dtype=torch.float64)[2].W_enc.dtype == torch.float64


@torch.no_grad()
def test_shipped_transcoders_reconstruct_held_out_mlp_outputs(model: Any, transcoders: list[SimpleSAE]) -> None:
    pairs = ioi_pairs(100, seed=11, split="test")
    hooks = {name for tc in transcoders for name in (tc.hook_name, tc.hook_name_out)}
    _, cache = model.run_with_cache(model.to_tokens(pairs.clean + pairs.corrupt), names_filter=lambda n: n in hooks)
    for layer, tc in enumerate(transcoders):
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][:, 1:].reshape(-1, model.cfg.d_model)  # BOS left out
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].reshape(-1, model.cfg.d_model)
        assert x.shape[0] == 200 * PROMPT_LENGTH
        pre = x @ tc.W_enc + tc.b_enc  # [tokens, d_sae]
        kth, next_one = pre.topk(K + 1, dim=-1).values[:, -2:].unbind(-1)  # [tokens] each
        f = torch.where(pre >= kth[:, None], pre.clamp_min(0), 0)  # the k largest, where no tie at the k-th
        untied = kth > next_one
        assert untied.float().mean() > 0.99 and torch.equal(f[untied], tc.encode(x[untied]))
        f = tc.encode(x)  # tied rows too
        sse = (y - (f @ tc.W_dec + tc.b_dec)).pow(2).sum()
        sst = (y - y.mean(0)).pow(2).sum()
        assert 1 - sse / sst >= EV_FLOOR, (layer, float(1 - sse / sst))
        l0 = (f > 0).sum(-1)
        assert l0.float().mean() >= K - 0.5 and l0.max() <= K, layer


@torch.no_grad()
def test_the_replacement_model_keeps_the_logit_difference(model: Any, transcoders: list[SimpleSAE]) -> None:
    """All four MLP outputs replaced by their transcoders' at every position but BOS, no error term."""
    pairs = ioi_pairs(40, seed=5, split="test")
    tokens = model.to_tokens(pairs.clean)
    answer, wrong = metrics.token_ids(model, pairs.answers), metrics.token_ids(model, pairs.wrongs)
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, tc in enumerate(transcoders):
        def read(act: torch.Tensor, hook: Any, layer: int = layer) -> None:
            inputs[layer] = act

        def write(act: torch.Tensor, hook: Any, tc: SimpleSAE = tc, layer: int = layer) -> torch.Tensor:
            x = inputs[layer]
            return torch.cat([act[:, :1], tc.decode(tc.encode(x[:, 1:]))], dim=1)

        hooks += [(tc.hook_name, read), (tc.hook_name_out, write)]

    def diff(logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(tokens))
        return logits[rows, -1, answer] - logits[rows, -1, wrong]

    base = diff(model(tokens))
    replaced = diff(model.run_with_hooks(tokens, fwd_hooks=hooks))
    assert sorted(inputs) == list(range(N_LAYERS))
    assert base.mean() > 5 and 0.9 <= replaced.mean() / base.mean() <= 1.1
    assert (replaced > 0).float().mean() >= 0.95


def test_transcoder_features_rank_nodes_on_the_demo_model(model: Any, transcoders: list[SimpleSAE]) -> None:
    pairs = ioi_pairs(6, seed=2, split="test")
    clean, corrupt = model.to_tokens(pairs.clean), model.to_tokens(pairs.corrupt)
    answer, wrong = metrics.token_ids(model, pairs.answers), metrics.token_ids(model, pairs.wrongs)
    metric = metrics.logit_diff(answer, wrong)
    picked = [transcoders[0], transcoders[2]]
    res = attribute(model, clean, corrupt, metric, nodes=[TranscoderFeatures(tc) for tc in picked], method="atp")
    top = res.top(10)
    assert len(top) == 10 and (top["score"] > 0).all()

    # AtP written out: the metric's gradient at each output hook on the clean prompts
    outs: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        outs[hook.name] = act

    logits = model.run_with_hooks(clean, fwd_hooks=[(tc.hook_name_out, keep) for tc in picked])
    rows = torch.arange(len(clean))
    value = (logits[rows, -1, answer] - logits[rows, -1, wrong]).sum()
    grads = dict(zip(outs, torch.autograd.grad(value, list(outs.values()))))
    with torch.no_grad():
        _, c = model.run_with_cache(clean, names_filter=lambda n: n.endswith("ln2.hook_normalized"))
        _, n = model.run_with_cache(corrupt, names_filter=lambda n: n.endswith("ln2.hook_normalized"))
        for tc in picked:
            name = f"transcoder:{tc.hook_name}->{tc.hook_name_out}"
            assert set(res.dims[name]) == {"pos", "feature"} and name + ".error" in res.signed
            delta = tc.encode(n[tc.hook_name]) - tc.encode(c[tc.hook_name])  # [N, T, d_sae]
            expected = (delta * (grads[str(tc.hook_name_out)] @ tc.W_dec.T)).mean(0)  # [T, d_sae]
            got = res.signed[name]
            assert got.shape == (1 + PROMPT_LENGTH, D_SAE)
            assert torch.allclose(got.double(), expected.double(), atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
            assert (got != 0).sum() >= 20 and torch.equal(got[0], torch.zeros(D_SAE))  # BOS: nothing changes

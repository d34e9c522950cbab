"""The SAE shipped with the demo model, and ``atp demo --sae``.

- The shipped SAE loads with SAE-Lens and fits the demo model (hook, width, model name).
- On held-out (test split) prompts its reconstruction explains at least 90% of the variance of its
  hook (``scripts/train_demo_sae.py`` measured 0.955 on 2000 pairs), computed here from the model's
  activations and the SAE's own encode/decode, with at most k=16 active features per token.
- ``atp demo --sae`` prints features whose numbers equal computations written out here, outside the
  library: the ``exact mean I`` and ``exact mean |I|`` of each row equal patching it by hand with
  TransformerLens hooks (a feature: ``a' = a + (f_noise - f_clean) * W_dec[i]`` at its position; an
  error node: ``a' = a + e_noise - e_clean``), the metric's change averaged over pairs signed and as
  magnitudes; the ``estimate`` equals
  AtP* written out: per pair ``c = 1/(L-1) sum_l |I_l|`` with ``I_l = delta f_i * (W_dec[i] . g_l)``,
  ``g_l`` the gradient at the hook with layer l's attention and MLP outputs detached (``g_l`` is the
  full gradient for the layers below the hook), then the mean over pairs.

The model and SAE are float32 as shipped; the CLI prints 4 decimals, so a printed number matches when
it is within half a unit of its last digit plus 1e-4 relative of the value computed here.
"""

from __future__ import annotations

import re

import pytest
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from atp_plugin.cli import main
from atp_plugin.demo_task import (
    PROMPT_LENGTH,
    ioi_pairs,
    load_demo_model,
    load_demo_sae,
)

HOOK = "blocks.2.hook_resid_pre"
N_PAIRS, TOP, SEED = 8, 6, 3


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return load_demo_model()


@pytest.fixture(scope="module")
def sae() -> SAE:
    return load_demo_sae()


def test_shipped_sae_fits_the_demo_model(model: HookedTransformer, sae: SAE) -> None:
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == 16
    assert sae.cfg.metadata.hook_name == HOOK and HOOK in model.hook_dict
    assert sae.cfg.metadata.model_name == model.cfg.model_name
    assert sae.cfg.d_in == model.cfg.d_model and sae.W_dec.shape == (512, model.cfg.d_model)
    assert sae.W_dec.dtype == torch.float32


@torch.no_grad()
def test_shipped_sae_reconstructs_held_out_activations(model: HookedTransformer, sae: SAE) -> None:
    pairs = ioi_pairs(500, seed=11, split="test")
    _, cache = model.run_with_cache(model.to_tokens(pairs.clean + pairs.corrupt), names_filter=HOOK)
    acts = cache[HOOK][:, 1:].reshape(-1, model.cfg.d_model)  # [tokens, d_model], BOS left out
    assert acts.shape[0] == 1000 * PROMPT_LENGTH
    feats = sae.encode(acts)  # [tokens, d_sae]
    sse = (acts - sae.decode(feats)).pow(2).sum()
    sst = (acts - acts.mean(0)).pow(2).sum()
    assert 1 - sse / sst >= 0.90
    l0 = (feats > 0).sum(-1).float()  # [tokens]
    assert l0.max() <= 16 and l0.mean() >= 8


_ROW = re.compile(r"^\s*sae:(?P<hook>\S+?)(?P<error>\.error)? @(?P<pos>\d+)(?: F(?P<feature>\d+))?"
                  r"\s+(?P<estimate>\S+)\s+(?P<mean_abs>\S+)\s+(?P<effect>\S+)\s*$")


def _hand_computed(model: HookedTransformer, sae: SAE, rows: list[dict]
                   ) -> tuple[list[torch.Tensor], list[float]]:
    """Exact per-pair effects ``[N]`` and AtP* estimate of every row, written out with TransformerLens hooks."""
    pairs = ioi_pairs(N_PAIRS, seed=SEED, split="test")
    clean, noise = model.to_tokens(pairs.clean), model.to_tokens(pairs.corrupt)  # [N, T]
    answer = torch.tensor([model.to_single_token(a) for a in pairs.answers])  # [N]
    wrong = torch.tensor([model.to_single_token(w) for w in pairs.wrongs])  # [N]
    batch = torch.arange(N_PAIRS)

    def metric(logits: torch.Tensor) -> torch.Tensor:  # [N]
        return logits[batch, -1, answer] - logits[batch, -1, wrong]

    with torch.no_grad():
        base = metric(model(clean))
        _, cache_c = model.run_with_cache(clean, names_filter=HOOK)
        _, cache_n = model.run_with_cache(noise, names_filter=HOOK)
        a_c, a_n = cache_c[HOOK], cache_n[HOOK]  # [N, T, d_model]
        f_c, f_n = sae.encode(a_c), sae.encode(a_n)  # [N, T, d_sae]
        e_c, e_n = a_c - sae.decode(f_c), a_n - sae.decode(f_n)  # [N, T, d_model]

    def delta(row: dict) -> torch.Tensor:
        """How patching the row moves the hook's value at its position: [N, d_model]."""
        t = row["pos"]
        if row["error"]:
            return e_n[:, t] - e_c[:, t]
        i = row["feature"]
        return (f_n[:, t, i] - f_c[:, t, i])[:, None] * sae.W_dec[i]

    effects = []
    for row in rows:
        def patch(act: torch.Tensor, hook, row=row) -> torch.Tensor:
            act = act.clone()
            act[:, row["pos"]] += delta(row)
            return act
        with torch.no_grad():
            effects.append(metric(model.run_with_hooks(clean, fwd_hooks=[(HOOK, patch)])) - base)  # [N]

    def grad_at_hook(cut_layer: int | None) -> torch.Tensor:
        """dL/d(hook value) on the clean run, [N, T, d_model]; with layer ``cut_layer``'s attention and
        MLP outputs detached, so gradient reaches the hook past that layer only through the skip."""
        kept = {}

        def keep(act: torch.Tensor, hook) -> torch.Tensor:
            act.retain_grad()
            kept["a"] = act
            return act

        hooks = [(HOOK, keep)]
        if cut_layer is not None:
            hooks += [(f"blocks.{cut_layer}.hook_{part}_out", lambda act, hook: act.detach())
                      for part in ("attn", "mlp")]
        metric(model.run_with_hooks(clean, fwd_hooks=hooks)).sum().backward()
        return kept["a"].grad

    n_layers, layer = model.cfg.n_layers, int(HOOK.split(".")[1])
    # Cutting a layer below the hook leaves its gradient as it is.
    grads = [grad_at_hook(None)] * layer + [grad_at_hook(cut) for cut in range(layer, n_layers)]
    estimates = []
    with torch.no_grad():
        for row in rows:
            per_layer = torch.stack([(delta(row) * g[:, row["pos"]]).sum(-1) for g in grads])  # [L, N]
            estimates.append(float((per_layer.abs().sum(0) / (n_layers - 1)).mean()))
    return effects, estimates


def test_atp_demo_sae_prints_verified_features(model: HookedTransformer, sae: SAE,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--sae", "--pairs", str(N_PAIRS), "--top", str(TOP), "--seed", str(SEED)]) == 0
    out = capsys.readouterr().out
    rows = []
    for line in out.splitlines():
        match = _ROW.match(line)
        if match:
            assert match["hook"] == HOOK, line
            rows.append({"pos": int(match["pos"]), "error": bool(match["error"]),
                         "feature": None if match["feature"] is None else int(match["feature"]),
                         "estimate": float(match["estimate"]), "effect": float(match["effect"]),
                         "mean_abs": float(match["mean_abs"])})
    assert len(rows) == TOP, out
    assert sum(not r["error"] for r in rows) >= TOP // 2, f"the table shows hardly any features:\n{out}"
    assert [r["estimate"] for r in rows] == sorted((r["estimate"] for r in rows), reverse=True)
    assert "atp*" in out and "verified the top" in out

    effects, estimates = _hand_computed(model, sae, rows)
    assert max(float(e.abs().max()) for e in effects) > 0.1, "no row has an effect: the comparison would prove little"
    for row, effect, estimate in zip(rows, effects, estimates):
        for what, printed, expected in (("exact mean I", row["effect"], float(effect.mean())),
                                        ("exact mean |I|", row["mean_abs"], float(effect.abs().mean())),
                                        ("estimate", row["estimate"], estimate)):
            assert abs(printed - expected) <= 5e-5 + 1e-4 * abs(expected), (row, what, printed, expected)
